"""Chat templates: Jinja text rendered exactly as ``transformers``' ``apply_chat_template`` renders it.

Which template (``data.template``):

- ``auto`` (default): the tokenizer's own template when it has one (SmolLM2-Instruct's ChatML with its default
  system prompt), else an error that asks for one of the others;
- ``tokenizer``: the tokenizer's own, required;
- ``chatml``: built-in ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``);
- ``llama2``: built-in Llama-2-chat as AgentLM was trained (``<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n...
  [/INST] answer </s>``), with AgentLM's default system prompt; it renders system, user and assistant turns
  only (a ``tool`` turn is a bad record, ``role_not_renderable``);
- a path to a ``.jinja`` file.

The environment mirrors transformers' ``_compile_jinja_template`` (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``{% generation %}`` blocks, its ``tojson``, ``raise_exception`` and
``strftime_now``), and templates receive the tokenizer's special tokens (``bos_token``, ``eos_token``, ...)
as transformers passes them, so the text we label is the text transformers renders from the exported
tokenizer folder, whose ``chat_template`` is the template we rendered with (see `tokenizer_files`).

Tool calls: a template that mentions ``tool_calls`` gets them natively (arguments as JSON objects, rendered by
the template's own ``tojson``); for one that does not (SmolLM2's, ChatML, Llama-2-chat), ``tool_format: auto``
writes each call into the assistant text as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
(Hermes / Qwen spelling; arguments encoded once, as an object) and the ``tools`` list into the system message,
so nothing the model should learn is silently dropped by the template.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from kiln.data_pipeline.sft.messages import BadRecord, Conversation

AGENTLM_SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set system_message = '" + AGENTLM_SYSTEM_PROMPT + "' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Llama-2-chat renders system, user and assistant turns only, not ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.index0 == 0 %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

BUILTIN = {"chatml": CHATML_TEMPLATE, "llama2": LLAMA2_TEMPLATE}
BUILTIN_ROLES = {"chatml": None, "llama2": ("system", "user", "assistant")}
TEMPLATE_CHOICES = ("auto", "tokenizer", "chatml", "llama2")


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # chatml, llama2, tokenizer, or the .jinja file's path
    source: str  # the Jinja text
    roles: tuple[str, ...] | None = None  # the roles it can render, when known (built-ins)

    @property
    def sha256(self) -> str:
        return "sha256:" + hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    @property
    def native_tools(self) -> bool:
        return "tool_calls" in self.source

    @cached_property
    def _compiled(self):
        return compile_template(self.source)

    def render(self, messages: list[dict], tools: list[dict] | None, special: dict[str, str], **kwargs) -> str:
        return self._compiled.render(messages=messages, tools=tools, documents=None, **special, **kwargs)

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "native_tool_calls": self.native_tools}


def compile_template(source: str):
    """A Jinja template compiled in the environment transformers uses for chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks; we
        # locate spans ourselves, so the block renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def resolve_template(spec: str, tokenizer_template: str | None) -> ChatTemplate:
    """``data.template`` -> the template (see the module docstring)."""
    if spec in BUILTIN:
        return ChatTemplate(spec, BUILTIN[spec], BUILTIN_ROLES[spec])
    if spec in ("auto", "tokenizer"):
        if tokenizer_template:
            return ChatTemplate("tokenizer", tokenizer_template)
        raise ValueError("the tokenizer has no chat template: set data.template to chatml, llama2 or a .jinja file")
    path = Path(spec)
    if path.suffix != ".jinja" or not path.is_file():
        raise ValueError(f"template {spec!r}: expected one of {list(TEMPLATE_CHOICES)} or an existing .jinja file")
    return ChatTemplate(str(path), path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ messages


def tool_call_text(name: str, arguments: dict) -> str:
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def tools_text(tools: list[dict]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return f"You can call these tools:\n<tools>\n{lines}\n</tools>"


@dataclass
class Turn:
    """One message as the template sees it, with what labelling needs to know about it."""

    message: dict[str, Any]  # role, content, tool_calls, name, tool_call_id as the template reads them
    probes: list[str]  # texts its rendered span must contain (else the template dropped them)
    train: bool | None  # the data's per-message flag (None: the loss policy decides)

    @property
    def role(self) -> str:
        return self.message["role"]


def template_turns(
    conv: Conversation, template: ChatTemplate, tool_format: str = "auto"
) -> tuple[list[Turn], list[dict] | None]:
    """The conversation as the template's messages, and its ``tools`` argument. ``tool_format``: ``native``
    passes tool calls and tools to the template, ``text`` writes them into the messages, ``auto`` is native only
    for templates that mention ``tool_calls``."""
    if template.roles is not None:
        for i, m in enumerate(conv.messages):
            if m.role not in template.roles:
                raise BadRecord(
                    "role_not_renderable",
                    f"message {i} is a {m.role!r} turn; {template.name} renders only {', '.join(template.roles)}",
                )
    native = template.native_tools if tool_format == "auto" else tool_format == "native"
    turns: list[Turn] = []
    for m in conv.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        probes = [m.content] if m.content else []
        if m.tool_calls:
            if native:
                d["tool_calls"] = [c.to_openai() for c in m.tool_calls]
                probes += [c.name for c in m.tool_calls]
            else:
                calls = "\n".join(tool_call_text(c.name, c.arguments) for c in m.tool_calls)
                d["content"] = f"{m.content}\n{calls}" if m.content else calls
                probes = [d["content"]]
        if m.role == "tool":
            if m.name:
                d["name"] = m.name
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
        turns.append(Turn(d, probes, m.train))
    tools = conv.tools
    if tools and not native:
        if turns and turns[0].role == "system":
            turns[0].message["content"] = f"{turns[0].message['content']}\n\n{tools_text(tools)}"
            turns[0].probes = [turns[0].message["content"]]
        else:
            text = tools_text(tools)
            turns.insert(0, Turn({"role": "system", "content": text}, [text], None))
        tools = None
    return turns, tools
