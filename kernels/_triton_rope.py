"""Triton rotary embedding (HF Llama rotate_half convention), forward and backward.

out[:d/2] = x1 * cos1 - x2 * sin1, out[d/2:] = x2 * cos2 + x1 * sin2 (x1/x2 the two halves of head_dim).
The map is linear in x, so backward applies its transpose: dx1 = g1 * cos1 + g2 * sin2, dx2 = g2 * cos2 - g1 * sin1.
One program per token rotates all heads of that token; cos/sin are read once per token. cos/sin get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    X, OUT, COS, SIN, S, cos_rows, stride_b, stride_s, stride_h, n_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    b = t // S
    s = t % S
    crow = t % cos_rows
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    c1 = tl.load(COS + crow * 2 * HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + crow * 2 * HALF + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + crow * 2 * HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + crow * 2 * HALF + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    mask = (offs_h[:, None] < n_heads) & d_mask[None, :]
    x_ptr = X + b * stride_b + s * stride_s + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    o_ptr = OUT + t * n_heads * 2 * HALF + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    b, s, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(b, s, h, d, dtype=x.dtype, device=x.device)
    half = d // 2
    _rope_kernel[(b * s,)](
        x, out, cos, sin, s, cos.shape[0], x.stride(0), x.stride(1), x.stride(2), h,
        HALF=half, BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(half), BACKWARD=backward,
    )  # fmt: skip
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(q, cos, sin, False), _rope(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return _rope(dq, cos, sin, True), _rope(dk, cos, sin, True), None, None


def apply_rope_triton(q, k, cos, sin):
    b, s, _, d = q.shape
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")
    if cos.dim() == 3:
        cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
    if cos.shape != (s, d) and cos.shape != (b * s, d):
        raise ValueError(f"cos/sin shape {tuple(cos.shape)} must be [seq, head_dim] or [batch*seq, head_dim]")
    return _Rope.apply(q, k, cos.contiguous(), sin.contiguous())
