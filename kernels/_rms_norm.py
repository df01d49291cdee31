"""RMSNorm entry point (optionally fused with the residual add)."""

from __future__ import annotations

import torch

from ._dispatch import resolve
from .reference import rms_norm_ref


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim.

    With ``residual``: h = x + residual; returns (rms_norm(h), h) — the new residual stream.
    """
    path = resolve("rms_norm", backend, x)
    if path == "triton":
        from ._triton_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
