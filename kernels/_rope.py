"""Rotary position embedding entry point (HF Llama rotate_half convention)."""

from __future__ import annotations

import torch

from ._dispatch import resolve
from .reference import apply_rope_ref


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto"):
    """Rotate q [batch, seq, n_heads, head_dim] and k [batch, seq, n_kv_heads, head_dim].

    cos/sin: [seq, head_dim] (shared by the batch), or [batch*seq, head_dim] / [batch, seq, head_dim] (per-row
    positions, e.g. positions restarting at each packed document). out = x * cos + rotate_half(x) * sin.
    """
    path = resolve("apply_rope", backend, q)
    if path == "triton":
        from ._triton_rope import apply_rope_triton

        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_ref(q, k, cos, sin)
