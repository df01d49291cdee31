"""Mixing sources into the training set: AgentTuning's eta, weights inside each role, oversampling with a cap.

Each source has a target share of the mix: ``eta`` for the agent role and ``1 - eta`` for the general role,
split inside a role by the sources' weights (default: proportional to their sizes). Shares count examples or
tokens (``by``). The mix is built one example at a time, always from the source furthest behind its target
(megatron's blending rule, here in ``by`` units), so after every step each source's realised share is within
one example of its target; it stops at the budget (``total_examples`` / ``total_tokens``; by default the
general pool used about once).

A source yields its examples in passes, each pass a fresh permutation drawn from ``(seed, source name,
pass)``: small sources are oversampled (an example repeats at most once per pass) and large ones undersampled,
and the same seed gives the same mix. At most ``max_repeats`` passes are drawn from a source; if one runs out
the mix stops there (shares stay on target, the total falls short) and the result names it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Pool:
    """One source's training examples, as the mixer sees them."""

    name: str
    role: str  # agent | general
    lengths: np.ndarray  # tokens per example
    weight: float | None = None  # share inside its role; None = its size


@dataclass
class MixResult:
    picks: list[tuple[int, int]]  # (pool number, example number) in mix order
    targets: list[float]  # target share of each pool
    passes: list[int] = field(default_factory=list)  # passes started per pool
    limited_by: str | None = None  # the pool whose repetition cap stopped the mix early
    budget: float = 0.0  # where the mix stops, in `unit`
    unit: str = "examples"

    def counts(self, n_pools: int) -> np.ndarray:
        return np.bincount(np.asarray([p for p, _ in self.picks], dtype=np.int64), minlength=n_pools)


class _Passes:
    def __init__(self, size: int, key: tuple[int, ...], max_passes: int):
        self.size, self.key, self.max_passes = size, key, max_passes
        self.passes, self.order, self.at = 0, np.zeros(0, dtype=np.int64), 0

    def next(self) -> int | None:
        if self.at == self.order.size:
            if self.passes == self.max_passes or self.size == 0:
                return None
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*self.key, self.passes])))
            self.order, self.at = rng.permutation(self.size), 0
            self.passes += 1
        self.at += 1
        return int(self.order[self.at - 1])


def name_key(name: str) -> int:
    """A stable integer for a source name: its random draws do not depend on where it sits in the recipe."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")


def target_shares(pools: list[Pool], eta: float, by: str) -> list[float]:
    shares = []
    role_share = {"agent": eta, "general": 1.0 - eta}
    sizes = [float(p.lengths.size if by == "examples" else p.lengths.sum()) for p in pools]
    weights = [s if p.weight is None else float(p.weight) for p, s in zip(pools, sizes)]
    for p, w in zip(pools, weights):
        total = sum(w2 for p2, w2 in zip(pools, weights) if p2.role == p.role)
        shares.append(role_share[p.role] * w / total if total > 0 else 0.0)
    return shares


def mix(
    pools: list[Pool],
    eta: float,
    by: str = "examples",
    total_examples: int | None = None,
    total_tokens: int | None = None,
    max_repeats: int = 100,
    seed: int = 0,
) -> MixResult:
    targets = target_shares(pools, eta, by)
    for p, t in zip(pools, targets):
        if t > 0 and p.lengths.size == 0:
            raise ValueError(f"source {p.name} has a target share of {t:.3f} but no usable example")
    if total_examples is not None:
        budget, unit = float(total_examples), "examples"
    elif total_tokens is not None:
        budget, unit = float(total_tokens), "tokens"
    else:
        role = "general" if eta < 1 else "agent"
        share = 1.0 - eta if eta < 1 else 1.0
        size = sum(p.lengths.size if by == "examples" else int(p.lengths.sum()) for p in pools if p.role == role)
        budget, unit = size / share, by
    active = [i for i, t in enumerate(targets) if t > 0]
    streams = {i: _Passes(pools[i].lengths.size, (seed, name_key(pools[i].name)), max_repeats) for i in active}
    taken = np.zeros(len(pools), dtype=np.float64)  # in `by` units
    q = np.asarray(targets, dtype=np.float64)
    picks: list[tuple[int, int]] = []
    done_examples = done_tokens = 0
    limited_by = None
    while active:
        if unit == "examples" and done_examples >= budget or unit == "tokens" and done_tokens >= budget:
            break
        units_so_far = done_examples if by == "examples" else done_tokens
        deficit = q[active] * (units_so_far + 1) - taken[active]
        k = active[int(np.argmax(deficit))]
        example = streams[k].next()
        if example is None:
            limited_by = pools[k].name
            break
        n = int(pools[k].lengths[example])
        picks.append((k, example))
        taken[k] += 1 if by == "examples" else n
        done_examples += 1
        done_tokens += n
    passes = [streams[i].passes if i in streams else 0 for i in range(len(pools))]
    return MixResult(picks, targets, passes, limited_by, budget, unit)
