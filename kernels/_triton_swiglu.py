"""Triton SwiGLU: out = silu(gate) * up, computed in fp32; backward recomputes sigmoid(gate).

d gate = g * up * sig * (1 + gate * (1 - sig)), d up = g * gate * sig.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, U, DO, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = do * u * sig * (1.0 + g * (1.0 - sig))
    du = do * silu
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


def _block(t: torch.Tensor) -> int:
    return 1024 if t.is_cuda else 4096


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        block = _block(gate)
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, do):
        gate, up = ctx.saved_tensors
        do = do.contiguous()
        dg = torch.empty_like(gate)
        du = torch.empty_like(up)
        n = gate.numel()
        block = _block(gate)
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](gate, up, do, dg, du, n, BLOCK=block)
        return dg, du


def swiglu_triton(gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    return _SwiGLU.apply(gate, up)
