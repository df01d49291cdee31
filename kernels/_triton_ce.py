"""Triton cross-entropy streaming over the vocabulary: the fp32 logits are never materialised.

Forward: one program per row walks the vocab in BLOCK_V chunks keeping a per-lane online (max, sum-exp), combines
them into the row's logsumexp, and stores loss = lse - x[label] (0 for ignore_index rows) and lse (fp32, [rows]).
Backward: one program per row recomputes softmax chunk by chunk, subtracts 1 at the label and scales by the
row's upstream gradient, writing d logits in the logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cross_entropy import _check, _grad_scale, _reduce


@triton.jit
def _ce_fwd_kernel(X, Y, LOSS, LSE, stride_x, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    label = tl.load(Y + row)
    valid = label != ignore_index
    target = tl.load(x_row + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(X, Y, LSE, G, DX, stride_x, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(Y + row)
    g = tl.load(G + row)
    g = tl.where(label != ignore_index, g, 0.0)
    lse = tl.load(LSE + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(DX + row * V + cols, (p * g).to(DX.dtype.element_ty), mask=mask)


def _block_v(x: torch.Tensor) -> int:
    return min(triton.next_power_of_2(x.shape[1]), 4096 if x.is_cuda else 1024)


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, ignore_index, reduction, out_shape):
        n, v = x.shape
        losses = torch.empty(n, dtype=torch.float32, device=x.device)
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        y = y.contiguous()
        block = _block_v(x)
        warps = 8 if x.is_cuda else 1
        _ce_fwd_kernel[(n,)](x, y, losses, lse, x.stride(0), v, ignore_index, BLOCK_V=block, num_warps=warps)
        n_valid = (y != ignore_index).sum()
        ctx.save_for_backward(x, y, lse, n_valid)
        ctx.meta = (ignore_index, reduction, block, warps)
        return _reduce(losses, n_valid, reduction, out_shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, lse, n_valid = ctx.saved_tensors
        ignore_index, reduction, block, warps = ctx.meta
        n, v = x.shape
        g = _grad_scale(grad_out, n_valid, reduction, n).contiguous()
        dx = torch.empty(n, v, dtype=x.dtype, device=x.device)
        _ce_bwd_kernel[(n,)](x, y, lse, g, dx, x.stride(0), v, ignore_index, BLOCK_V=block, num_warps=warps)
        return dx, None, None, None, None


def cross_entropy_triton(logits, labels, ignore_index=-100, reduction="mean"):
    x, y = _check(logits, labels, reduction)
    out = _TritonCrossEntropy.apply(x, y, ignore_index, reduction, labels.shape)
    return out
