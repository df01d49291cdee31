"""Best-fit-decreasing packing of conversations into fixed-capacity sequences (as OLMo-core packs documents).

Conversations are placed longest first (ties in input order), each into the open sequence with the least room
that still holds it, else into a new one. Every conversation stays whole and keeps its own document entry in
the output's index, so the trainer restarts positions and keeps attention inside each one; packing never
looks at EOS tokens.
"""

from __future__ import annotations

import bisect

import numpy as np


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, in placement order) holding every item; each bin's total <= capacity."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"items must be 1..{capacity} tokens long")
    order = np.lexsort((np.arange(lengths.size), -lengths))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for item in order.tolist():
        size = int(lengths[item])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(item)
            room -= size
        else:
            b = len(bins)
            bins.append([item])
            room = capacity - size
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def packing_efficiency(lengths, bins: list[list[int]], capacity: int) -> float:
    """Non-pad tokens / all token slots of the packed sequences."""
    if not bins:
        return 0.0
    return float(np.asarray(lengths, dtype=np.int64).sum() / (len(bins) * capacity))
