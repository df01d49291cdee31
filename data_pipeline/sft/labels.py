"""Token ids and loss mask of one conversation, from one render of the whole conversation.

How a row is labelled (and why it can be set aside instead):

1. The conversation is rendered once (``full``); its ids are the tokenization of ``full``, nothing else.
2. Each turn's span is found by rendering prefixes: ``render(turns[:i+1])`` must be a prefix of ``full`` (its
   length is where turn ``i`` ends), and for a trained assistant turn ``render(turns[:i],
   add_generation_prompt=True)`` must be too (its length is where the answer starts, after the header the
   model is prompted with). A template whose prefixes are not prefixes of the full render (one that rewrites
   earlier turns, say) cannot be labelled this way: ``template_not_prefix_stable``.
3. The span of a trained assistant turn must contain the turn's text (and tool calls), in order; else the
   template dropped them (``template_drops_content``). The span runs from the answer's start through the first
   control token after the text (the end-of-turn token: ``<|im_end|>``, ``</s>``, ...), which is trained;
   whatever the template puts after it (ChatML's newline) is not. A template with no control token after the
   answer trains the answer up to the next turn.
4. ``full`` is cut at every span boundary and each piece is tokenized alone: the pieces' ids must concatenate
   to the ids of ``full`` (``tokenization_differs_in_context``, what makes every label -100 in TRL #598
   when a marker tokenizes differently in context). Then each token is wholly inside or outside a span, and its
   mask is exact.

Loss policy (``data.loss``): ``assistant`` (every assistant turn), ``last_assistant`` (only the last one) or
``all`` (every turn, headers included); a message's own flag (AgentInstruct ``loss``) overrides the policy
either way. A trained non-assistant turn trains its whole rendered span. The first token of a conversation is
never a target. A row left with no trainable token is ``no_trainable_tokens`` (never an all-zero mask).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from kiln.data_pipeline.sft.messages import BadRecord, Conversation
from kiln.data_pipeline.sft.templates import ChatTemplate, Turn, template_turns
from kiln.data_pipeline.sft.tokenizer_files import ChatTokenizer

LOSS_POLICIES = ("assistant", "last_assistant", "all")


@dataclass
class Labelled:
    ids: np.ndarray  # int64 token ids of the whole rendered conversation
    mask: np.ndarray  # uint8, 1 = the token is a prediction target
    turn_ends: np.ndarray  # int64, token index where each template turn's span ends
    roles: list[str]  # role of each template turn
    text: str | None  # the rendered conversation (None once cut by the too-long policy)

    @property
    def trainable(self) -> int:
        return int(self.mask.sum())


@dataclass
class _Plan:
    full: str
    cuts: list[int]  # sorted character boundaries, 0 and len(full) included
    trained: list[tuple[int, int]]  # character ranges with loss
    ends: list[int]  # character end of each turn
    roles: list[str]


class Labeller:
    """Labels conversations for one tokenizer, template, loss policy and tool format."""

    def __init__(self, tokenizer: ChatTokenizer, template: ChatTemplate, loss: str = "assistant", tool_format="auto"):
        if loss not in LOSS_POLICIES:
            raise ValueError(f"loss policy must be one of {list(LOSS_POLICIES)}, got {loss!r}")
        self.tokenizer, self.template, self.loss, self.tool_format = tokenizer, template, loss, tool_format
        self.control = tokenizer.control_tokens(template.source)
        self.special = dict(tokenizer.special_tokens)

    # -------------------------------------------------------------------------------------------- rendering

    def _render(self, turns: list[Turn], tools, generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self.template.render(
                [t.message for t in turns], tools, self.special, add_generation_prompt=generation_prompt
            )
        except jinja2.TemplateError as e:
            raise BadRecord("template_error", str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise BadRecord("template_error", f"{type(e).__name__}: {e}") from None

    def _trains(self, turns: list[Turn]) -> list[bool]:
        assistants = [i for i, t in enumerate(turns) if t.role == "assistant"]
        out = []
        for i, t in enumerate(turns):
            if self.loss == "all":
                train = True
            elif self.loss == "last_assistant":
                train = bool(assistants) and i == assistants[-1]
            else:
                train = t.role == "assistant"
            out.append(train if t.train is None else t.train)
        return out

    def _check_controls(self, turns: list[Turn], tools) -> None:
        texts = [(i, p) for i, t in enumerate(turns) for p in t.probes]
        if tools:
            texts.append((-1, json.dumps(tools, ensure_ascii=False)))
        for i, text in texts:
            for token in self.control:
                if token in text:
                    where = f"message {i}" if i >= 0 else "the tools list"
                    raise BadRecord(
                        "special_token_in_content", f"{where} contains the control token {token!r} as plain text"
                    )

    def plan(self, conv: Conversation) -> _Plan:
        turns, tools = template_turns(conv, self.template, self.tool_format)
        self._check_controls(turns, tools)
        trains = self._trains(turns)
        full = self._render(turns, tools)
        ends: list[int] = []
        for i in range(len(turns)):
            prefix = full if i == len(turns) - 1 else self._render(turns[: i + 1], tools)
            if not full.startswith(prefix) or (ends and len(prefix) < ends[-1]):
                raise BadRecord(
                    "template_not_prefix_stable",
                    f"rendering the first {i + 1} turns is not a prefix of the full render",
                )
            ends.append(len(prefix))
        trained: list[tuple[int, int]] = []
        for i, (turn, train) in enumerate(zip(turns, trains)):
            seg_start = ends[i - 1] if i else 0
            if not train:
                continue
            if turn.role != "assistant" or self.loss == "all":
                trained.append((seg_start, ends[i]))
                continue
            head = self._render(turns[:i], tools, generation_prompt=True)
            if not full.startswith(head) or not seg_start <= len(head) <= ends[i]:
                raise BadRecord(
                    "template_not_prefix_stable",
                    f"the generation prompt before message {i} is not a prefix of the render",
                )
            start = pos = len(head)
            for probe in turn.probes:
                found = full.find(probe, pos, ends[i])
                if found < 0:
                    raise BadRecord(
                        "template_drops_content", f"message {i}: the render does not contain {probe[:60]!r}"
                    )
                pos = found + len(probe)
            trained.append((start, self._end_of_turn(full, pos, ends[i])))
        if not trained:
            raise BadRecord("no_trainable_tokens", "no turn carries loss under the policy and the per-message flags")
        cuts = sorted({0, len(full), *ends, *(a for a, _ in trained), *(b for _, b in trained)})
        return _Plan(full, cuts, trained, ends, [t.role for t in turns])

    def _end_of_turn(self, full: str, content_end: int, turn_end: int) -> int:
        """End of the first control token after the answer (inclusive span end), else the turn's end."""
        best = None
        for token in self.control:
            at = full.find(token, content_end, turn_end)
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(token) > best[1])):
                best = (at, len(token))
        return turn_end if best is None else best[0] + best[1]

    # -------------------------------------------------------------------------------------------- tokens

    def label_batch(self, convs: list[Conversation]) -> list[Labelled | BadRecord]:
        """Label many conversations with two batched tokenizer calls (full renders, then their pieces)."""
        plans: list[_Plan | BadRecord] = []
        for conv in convs:
            try:
                plans.append(self.plan(conv))
            except BadRecord as e:
                plans.append(e)
        good = [p for p in plans if isinstance(p, _Plan)]
        fulls = self.tokenizer.encode_batch([p.full for p in good])
        pieces = self.tokenizer.encode_batch([p.full[a:b] for p in good for a, b in zip(p.cuts, p.cuts[1:])])
        out: list[Labelled | BadRecord] = []
        k = g = 0
        for plan in plans:
            if isinstance(plan, BadRecord):
                out.append(plan)
                continue
            n = len(plan.cuts) - 1
            out.append(self._label(plan, fulls[g], pieces[k : k + n]))
            g, k = g + 1, k + n
        return out

    def label(self, conv: Conversation) -> Labelled:
        result = self.label_batch([conv])[0]
        if isinstance(result, BadRecord):
            raise result
        return result

    def _label(self, plan: _Plan, full_ids: list[int], piece_ids: list[list[int]]) -> Labelled | BadRecord:
        joined = [i for piece in piece_ids for i in piece]
        if joined != full_ids:
            at = next((j for j, (a, b) in enumerate(zip(joined, full_ids)) if a != b), min(len(joined), len(full_ids)))
            return BadRecord(
                "tokenization_differs_in_context",
                f"turn pieces tokenize differently from the full render (first difference at token {at})",
            )
        token_at = dict.fromkeys(plan.cuts, 0)
        mask = np.zeros(len(full_ids), dtype=np.uint8)
        pos = 0
        for (a, b), piece in zip(zip(plan.cuts, plan.cuts[1:]), piece_ids):
            token_at[a] = pos
            if any(s <= a and b <= e for s, e in plan.trained):
                mask[pos : pos + len(piece)] = 1
            pos += len(piece)
        token_at[plan.cuts[-1]] = pos
        if mask.size:
            mask[0] = 0  # the first token of a conversation is never a target
        if not mask.any():
            return BadRecord("no_trainable_tokens", "the trained spans hold no token after the first")
        return Labelled(
            ids=np.asarray(full_ids, dtype=np.int64),
            mask=mask,
            turn_ends=np.asarray([token_at[e] for e in plan.ends], dtype=np.int64),
            roles=plan.roles,
            text=plan.full,
        )
