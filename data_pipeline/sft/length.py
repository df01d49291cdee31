"""Conversations longer than the context: dropped, or cut at a turn boundary keeping the scaffold.

``truncate`` keeps the longest prefix that ends right after an assistant turn, fits the context and still has
a trainable token: the scaffold at the head of a trajectory (system prompt, task, AgentInstruct's "Ok." and
in-context examples) is always kept whole, and the cut never falls inside a turn, so the last kept answer
keeps its end-of-turn token. The prefix's ids are exactly the render of the shorter conversation (labels come
from prefix renders, see `labels`). A conversation whose scaffold and first trained answer do not fit is
dropped as ``too_long_to_truncate``; under ``drop`` every over-long conversation is ``too_long``.
"""

from __future__ import annotations

from dataclasses import replace

from kiln.data_pipeline.sft.labels import Labelled
from kiln.data_pipeline.sft.messages import BadRecord

TOO_LONG_POLICIES = ("truncate", "drop")


def fit_to_context(lab: Labelled, capacity: int, policy: str) -> tuple[Labelled, bool]:
    """(the conversation, or its cut prefix; whether it was cut); raises `BadRecord` when it cannot fit."""
    n = lab.ids.size
    if n <= capacity:
        return lab, False
    if policy == "drop":
        raise BadRecord("too_long", f"{n} tokens > {capacity} (seq_length + 1)")
    best = None
    for i, (role, end) in enumerate(zip(lab.roles, lab.turn_ends)):
        if role == "assistant" and end <= capacity and lab.mask[:end].any():
            best = i
    if best is None:
        raise BadRecord(
            "too_long_to_truncate",
            f"{n} tokens > {capacity}, and the scaffold with the first trained answer does not fit",
        )
    end = int(lab.turn_ends[best])
    cut = replace(
        lab,
        ids=lab.ids[:end],
        mask=lab.mask[:end],
        turn_ends=lab.turn_ends[: best + 1],
        roles=lab.roles[: best + 1],
        text=None,
    )
    return cut, True
