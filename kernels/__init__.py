"""Fused kernels and the attention dispatch (public API: see kernels/CONTRACT.md).

Every entry point takes ``backend``: "auto" picks the fastest available path for the tensor's device (Triton on
CUDA, flash-attn first for attention; plain PyTorch / SDPA on CPU), "triton" forces our Triton kernels (on CPU
they need ``TRITON_INTERPRET=1``), "torch"/"sdpa" the plain-PyTorch path, "flash" flash-attn varlen. When the
requested path is unavailable the call falls back safely and logs one line on the "kiln.kernels" logger.
"""

from ._attention import attention
from ._cross_entropy import cross_entropy
from ._rms_norm import rms_norm
from ._rope import apply_rope
from ._swiglu import swiglu

__all__ = ["attention", "rms_norm", "apply_rope", "swiglu", "cross_entropy"]
