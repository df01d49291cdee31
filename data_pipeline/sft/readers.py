"""Readers: every supported record format -> one canonical `Conversation` (`messages.py`).

Formats (``format:`` of a source; ``auto`` detects it from the first record of each file):

- ``sharegpt``: ``conversations: [{from, value, loss?}]`` (ShareGPT, FastChat, AgentInstruct, ETO) or the
  ``role/content`` spelling of the same list (ADP's AgentInstruct export); ``from`` human/user, gpt/assistant,
  system, function_call (an assistant tool call whose value is ``{"name", "arguments"}``), observation/function/
  tool (a tool result); optional top-level ``system`` and ``tools``. AgentInstruct's ``loss`` (true / false /
  null) is the per-message train flag. The agent-environment issue writes its TextWorld trajectories as
  AgentInstruct-style ShareGPT records (task prompt, ``gpt`` "Ok." with ``loss: false``, then observation /
  action turns), so they are read by this reader with no code of their own.
- ``openai``: ``messages: [{role, content, tool_calls?, tool_call_id?, name?}]`` plus an optional ``tools``
  list; ``tool_calls[].function.arguments`` may be a JSON string (the API's spelling) or an object; either way
  it becomes a JSON object, and a string that is not a JSON object is a bad record (``invalid_tool_arguments``).
- ``alpaca``: ``instruction``, ``input``, ``output``, optional ``history: [[query, answer], ...]`` and
  ``system``; self-instruct seed tasks (``instances: [{input, output}]``) use their first instance.
- ``raw_dialogue``: one string ``\\n\\nHuman: ... \\n\\nAssistant: ...`` (hh-rlhf's ``chosen``), in the field named
  by the source's ``field`` (default: ``chosen``, else ``text``).
- ``sweagent``: SWE-agent ``.traj`` records: ``history: [{role, content, tool_calls?, tool_call_ids?}]``; the
  demonstration and the task (two user messages in a row, a fix specific to the format) are joined into one
  user turn.
- ``toolbench``: ToolBench DFS answers, ``answer_generation.train_messages[-1]`` (the full conversation; the
  earlier entries are its prefixes), ``function`` turns as tool results, ``function_call`` as a tool call.

Per-message ``loss`` / ``train`` (bool) or ``weight`` (0 / 1, axolotl's spelling) is the train flag in every
format that has messages. Each reader raises `BadRecord` for what it cannot read; `check_structure` then checks
roles, empty turns and alternation for every format alike.
"""

from __future__ import annotations

import ast
import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from kiln.data_pipeline.sft.messages import BadRecord, Conversation, Message, ToolCall

FORMATS = ("sharegpt", "openai", "alpaca", "raw_dialogue", "sweagent", "toolbench")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "observation": "tool",
    "function": "tool",
    "tool": "tool",
    "function_call": "assistant",  # value is the call
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
OPENAI_ROLES["function"] = "tool"  # the legacy functions API


# ------------------------------------------------------------------------------------------------ files


def expand_paths(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (paths or globs, relative to the working directory), sorted, deduplicated."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        files.extend(p for p in matched if os.path.isfile(p))
    return list(dict.fromkeys(files))


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def iter_json_records(path: str) -> Iterator[tuple[int, Any]]:
    """(record index, parsed record or `BadRecord`) of a JSON-lines file or a JSON list (``.gz`` allowed)."""
    base = path[:-3] if path.endswith(".gz") else path
    with _open_text(path) as f:
        if base.endswith(".json"):
            text = f.read()
            try:
                data = json.loads(text)
            except ValueError:
                data = None  # JSON lines under a .json name: read line by line below
            if isinstance(data, list):
                yield from enumerate(data)
                return
            if isinstance(data, dict):
                yield 0, data
                return
            lines = text.splitlines()
        else:
            lines = f
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except ValueError as e:
                yield i, BadRecord("invalid_json", f"line {i + 1}: {e}")


def detect_format(record: Any) -> str | None:
    """The format a record is in, from its keys (None: none of ours)."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if isinstance(record.get("messages"), list):
        return "openai"
    if isinstance(record.get("answer_generation"), dict):
        return "toolbench"
    if "instruction" in record:
        return "alpaca"
    history = record.get("history")
    if isinstance(history, list) and history and isinstance(history[0], dict) and "role" in history[0]:
        return "sweagent"
    for key in ("chosen", "text"):
        if isinstance(record.get(key), str) and "\n\nHuman:" in record[key]:
            return "raw_dialogue"
    return None


def read_file(
    path: str, fmt: str, field: str | None = None, found: dict | None = None
) -> Iterator[tuple[int, Conversation | BadRecord]]:
    """(record index, conversation or `BadRecord`) for every record of one file.

    The file's format is checked on its first record: a file that is not in the declared format (or, with
    ``auto``, in none we know) yields ``not_declared_format`` for each of its records, nothing else. ``found``,
    when given, receives the format read under ``"format"`` (None for such a file)."""
    records = iter_json_records(path)
    checked = None
    for index, record in records:
        if isinstance(record, BadRecord):
            yield index, record
            continue
        if checked is None:
            detected = detect_format(record)
            checked = fmt if fmt != "auto" else detected
            if checked is None or (fmt != "auto" and detected != fmt):
                what = f"declared {fmt!r}" if fmt != "auto" else "format auto"
                bad = BadRecord(
                    "not_declared_format",
                    f"{what}, but its first record looks like {detected or 'no format we read'} "
                    f"(keys: {sorted(record)[:8] if isinstance(record, dict) else type(record).__name__})",
                )
                if found is not None:
                    found["format"] = None
                yield index, bad
                for i, _ in records:
                    yield i, BadRecord("not_declared_format", bad.detail)
                return
            if found is not None:
                found["format"] = checked
        try:
            yield index, READERS[checked](record, field)
        except BadRecord as e:
            yield index, e


# ------------------------------------------------------------------------------------------------ helpers


def _train_flag(item: dict) -> bool | None:
    for key in ("loss", "train"):
        value = item.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise BadRecord("malformed_record", f"{key!r} must be true, false or null, got {value!r}")
            return value
    weight = item.get("weight")
    if weight is not None:
        if weight not in (0, 1):
            raise BadRecord("malformed_record", f"'weight' must be 0 or 1, got {weight!r}")
        return bool(weight)
    return None


def _text(value: Any, what: str) -> str:
    """Message content as text: a string, None (empty), or a list of ``{"type": "text", "text": ...}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise BadRecord("malformed_record", f"{what}: only text content parts are supported, got {part!r}")
        return "".join(parts)
    raise BadRecord("malformed_record", f"{what}: content must be text, got {type(value).__name__}")


def _tool_result_text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return _text(value, "tool result")


def parse_arguments(raw: Any, where: str) -> dict[str, Any]:
    """Tool-call arguments -> a JSON object. A JSON string is decoded (twice if it was double-encoded); anything
    that does not end up as a JSON object is ``invalid_tool_arguments``."""
    value = raw
    for _ in range(2):
        if not isinstance(value, str):
            break
        try:
            value = json.loads(value)
        except ValueError as e:
            raise BadRecord(
                "invalid_tool_arguments", f"{where}: arguments are not valid JSON ({e}): {raw!r:.120}"
            ) from None
    if not isinstance(value, dict):
        raise BadRecord("invalid_tool_arguments", f"{where}: arguments must be a JSON object, got {raw!r:.120}")
    return value


def _loose_literal(value: Any, where: str) -> Any:
    """A field some tools store as a Python repr or JSON string (ToolBench's function_call, SWE-agent's
    tool_calls) -> the object."""
    if not isinstance(value, str):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError):
            continue
    raise BadRecord("malformed_record", f"{where}: cannot parse {value!r:.120}")


def _tool_call(raw: Any, where: str) -> ToolCall:
    raw = _loose_literal(raw, where)
    if not isinstance(raw, dict):
        raise BadRecord("malformed_record", f"{where}: a tool call must be an object, got {raw!r:.120}")
    fn = raw.get("function", raw)  # OpenAI nests {name, arguments} under "function"; older spellings do not
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRecord("malformed_record", f"{where}: a tool call needs a function name, got {raw!r:.120}")
    arguments = parse_arguments(fn.get("arguments", {}), f"{where} ({fn['name']})")
    return ToolCall(fn["name"], arguments, raw.get("id"))


def _tools(value: Any) -> list[dict] | None:
    if value is None or value == "" or value == []:
        return None
    value = _loose_literal(value, "tools")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRecord("malformed_record", f"'tools' must be a list of JSON schemas, got {value!r:.120}")
    return value


def _messages_list(record: dict, key: str) -> list:
    value = record.get(key)
    if not isinstance(value, list):
        raise BadRecord("malformed_record", f"{key!r} must be a list")
    return value


# ------------------------------------------------------------------------------------------------ formats


def read_sharegpt(record: dict, field: str | None = None) -> Conversation:
    messages: list[Message] = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append(Message("system", record["system"]))
    for i, item in enumerate(_messages_list(record, "conversations")):
        if not isinstance(item, dict):
            raise BadRecord("malformed_record", f"message {i} is not an object")
        speaker = item.get("from", item.get("role"))
        value = item.get("value", item.get("content"))
        if not isinstance(speaker, str):
            raise BadRecord("malformed_record", f"message {i} has no 'from'/'role'")
        role = SHAREGPT_ROLES.get(speaker.lower(), speaker)
        flag = _train_flag(item)
        if speaker.lower() == "function_call":
            messages.append(Message("assistant", "", [_tool_call(value, f"message {i}")], flag))
        elif role == "tool":
            messages.append(Message("tool", _tool_result_text(value), train=flag, name=item.get("name")))
        else:
            messages.append(Message(role, _text(value, f"message {i}"), train=flag))
    return Conversation(messages, _tools(record.get("tools")), _id(record))


def read_openai(record: dict, field: str | None = None) -> Conversation:
    messages: list[Message] = []
    for i, item in enumerate(_messages_list(record, "messages")):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise BadRecord("malformed_record", f"message {i} is not an object with a 'role'")
        role = OPENAI_ROLES.get(item["role"], item["role"])
        flag = _train_flag(item)
        if role == "tool":
            messages.append(
                Message(
                    "tool",
                    _tool_result_text(item.get("content")),
                    train=flag,
                    name=item.get("name"),
                    tool_call_id=item.get("tool_call_id"),
                )
            )
            continue
        calls = [_tool_call(c, f"message {i} tool call {k}") for k, c in enumerate(item.get("tool_calls") or [])]
        if item.get("function_call"):
            calls.append(_tool_call(item["function_call"], f"message {i} function_call"))
        messages.append(Message(role, _text(item.get("content"), f"message {i}"), calls, flag))
    return Conversation(messages, _tools(record.get("tools")), _id(record))


def read_alpaca(record: dict, field: str | None = None) -> Conversation:
    output, query = record.get("output"), record.get("input", "")
    instances = record.get("instances")
    if output is None and isinstance(instances, list) and instances and isinstance(instances[0], dict):
        query, output = instances[0].get("input", ""), instances[0].get("output")
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(query, (str, type(None))):
        raise BadRecord("malformed_record", "alpaca records need string 'instruction' and 'output'")
    messages: list[Message] = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append(Message("system", record["system"]))
    for k, turn in enumerate(record.get("history") or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRecord("malformed_record", f"history entry {k} must be [query, answer]")
        messages += [Message("user", turn[0]), Message("assistant", turn[1])]
    prompt = instruction if not query else f"{instruction}\n\n{query}"
    messages += [Message("user", prompt), Message("assistant", output)]
    return Conversation(messages, None, _id(record))


_DIALOGUE_SPLIT = re.compile(r"\n\n(Human|Assistant):[ ]?")


def read_raw_dialogue(record: dict, field: str | None = None) -> Conversation:
    keys = [field] if field else ["chosen", "text"]
    text = next((record[k] for k in keys if isinstance(record.get(k), str)), None)
    if text is None:
        raise BadRecord("malformed_record", f"no dialogue string in field {' / '.join(keys)}")
    parts = _DIALOGUE_SPLIT.split(text)
    if parts[0].strip():
        raise BadRecord("malformed_record", "text before the first '\\n\\nHuman:' / '\\n\\nAssistant:' marker")
    if len(parts) < 3:
        raise BadRecord("malformed_record", "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    speakers, contents = parts[1::2], parts[2::2]
    messages = [Message("user" if s == "Human" else "assistant", c) for s, c in zip(speakers, contents)]
    return Conversation(messages, None, _id(record))


def read_sweagent(record: dict, field: str | None = None) -> Conversation:
    messages: list[Message] = []
    for i, item in enumerate(_messages_list(record, "history")):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise BadRecord("malformed_record", f"history entry {i} is not an object with a 'role'")
        role, content = item["role"], _text(item.get("content"), f"history entry {i}")
        if role == "tool":
            ids = _loose_literal(item.get("tool_call_ids"), f"history entry {i} tool_call_ids")
            call_id = ids[0] if isinstance(ids, list) and ids else None
            messages.append(Message("tool", content, train=_train_flag(item), tool_call_id=call_id))
            continue
        raw_calls = _loose_literal(item.get("tool_calls"), f"history entry {i} tool_calls") or []
        calls = [_tool_call(c, f"history entry {i} tool call {k}") for k, c in enumerate(raw_calls)]
        if role == "user" and messages and messages[-1].role == "user":  # demonstration + task
            messages[-1].content = f"{messages[-1].content}\n\n{content}"
            continue
        messages.append(Message(role, content, calls, _train_flag(item)))
    return Conversation(messages, _tools(record.get("tools")), _id(record) or record.get("source_path"))


def read_toolbench(record: dict, field: str | None = None) -> Conversation:
    generation = record.get("answer_generation") or {}
    train = generation.get("train_messages")
    if not isinstance(train, list) or not train or not isinstance(train[-1], list):
        raise BadRecord("malformed_record", "no answer_generation.train_messages (an invalid ToolBench answer)")
    messages: list[Message] = []
    for i, item in enumerate(train[-1]):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise BadRecord("malformed_record", f"message {i} is not an object with a 'role'")
        role = "tool" if item["role"] == "function" else item["role"]
        content = item.get("content")
        if role == "tool":
            messages.append(Message("tool", _tool_result_text(content), name=item.get("name")))
            continue
        calls = [_tool_call(item["function_call"], f"message {i}")] if item.get("function_call") else []
        text = "" if calls and content in (None, "None") else _text(content, f"message {i}")
        messages.append(Message(role, text, calls))
    return Conversation(messages, None, _id(record) or record.get("source_path"))


def _id(record: dict) -> str | None:
    value = record.get("id")
    return None if value is None else str(value)


READERS = {
    "sharegpt": read_sharegpt,
    "openai": read_openai,
    "alpaca": read_alpaca,
    "raw_dialogue": read_raw_dialogue,
    "sweagent": read_sweagent,
    "toolbench": read_toolbench,
}


def normalise(conv: Conversation, strip: bool = True, drop_trailing: bool = False) -> tuple[Conversation, int]:
    """(the conversation, how many trailing turns were dropped).

    ``strip``: strip surrounding whitespace from every message (templates such as Llama-2-chat strip it anyway,
    and a leading newline would otherwise merge with the template's header newline into one token).
    ``drop_trailing``: drop the turns after the last assistant turn: agent trajectories (FireAct, SWE-agent)
    end on the environment's reply to the final action, which nothing answers; without it such a row is
    ``ends_on_user_turn``."""
    if strip:
        for m in conv.messages:
            m.content = m.content.strip()
    dropped = 0
    if drop_trailing and any(m.role == "assistant" for m in conv.messages):
        while conv.messages[-1].role != "assistant":
            conv.messages.pop()
            dropped += 1
    return conv, dropped
