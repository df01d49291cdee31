"""The canonical conversation every reader produces, and the structural checks every row passes.

A `Conversation` is a list of `Message`s (role ``system`` / ``user`` / ``assistant`` / ``tool``, text content,
tool calls with their arguments as JSON *objects*, and a per-message ``train`` flag: True / False from the data
(AgentInstruct's ``loss``), None = decided by the loss policy), plus the ``tools`` the conversation may call.

A row that cannot be used raises `BadRecord` with a short, stable reason (the key it is counted under in
report.json); nothing is repaired silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class BadRecord(Exception):
    """A row set aside: ``reason`` is the counting key, ``detail`` says what exactly was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]  # a JSON object, never a JSON-encoded string
    id: str | None = None

    def to_openai(self) -> dict[str, Any]:
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if self.id is not None:
            call["id"] = self.id
        return call


@dataclass
class Message:
    role: str
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    train: bool | None = None  # the data's own per-message loss flag; None = the loss policy decides
    name: str | None = None  # tool name of a tool result
    tool_call_id: str | None = None


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None  # JSON schemas of the callable tools (OpenAI `tools`)
    id: str | None = None


def check_structure(conv: Conversation) -> None:
    """Raise `BadRecord` unless the conversation is one a chat template can render and we can label:

    - every role is one of `ROLES` (``unknown_role``) and no turn is empty (``empty_turn``: no text and no
      tool call);
    - an optional system message first, then user / assistant alternating, tool results only right after an
      assistant turn that made tool calls (or after another tool result), a user turn may follow a tool result
      (``non_alternating``);
    - the last turn is an assistant turn (``ends_on_user_turn``: nothing to learn from a trailing prompt).
    """
    msgs = conv.messages
    if not msgs:
        raise BadRecord("empty_turn", "the conversation has no messages")
    for i, m in enumerate(msgs):
        if m.role not in ROLES:
            raise BadRecord("unknown_role", f"message {i} has role {m.role!r}")
    for i, m in enumerate(msgs):
        if not m.content.strip() and not m.tool_calls:
            raise BadRecord("empty_turn", f"message {i} ({m.role}) is empty")
    for i, m in enumerate(msgs):
        prev = msgs[i - 1] if i else None
        if prev is None:
            ok: tuple[str, ...] = ("system", "user")
        elif prev.role == "system":
            ok = ("user",)
        elif prev.role == "user":
            ok = ("assistant",)
        elif prev.role == "assistant":
            ok = ("user", "tool") if prev.tool_calls else ("user",)
        else:  # a tool result
            ok = ("tool", "assistant", "user")
        if m.role not in ok:
            where = f"after a {prev.role!r} turn" if prev else "first"
            raise BadRecord("non_alternating", f"message {i} is {m.role!r} {where} (expected {' or '.join(ok)})")
    if msgs[-1].role != "assistant":
        raise BadRecord("ends_on_user_turn", f"the last message is a {msgs[-1].role!r} turn")
