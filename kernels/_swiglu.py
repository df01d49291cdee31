"""SwiGLU activation entry point: silu(gate) * up."""

from __future__ import annotations

import torch

from ._dispatch import resolve
from .reference import swiglu_ref


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, elementwise (same shapes)."""
    path = resolve("swiglu", backend, gate)
    if path == "triton":
        from ._triton_swiglu import swiglu_triton

        return swiglu_triton(gate, up)
    return swiglu_ref(gate, up)
