"""Triton RMSNorm, optionally fused with the residual add (h = x + residual; y = rms_norm(h); returns y, h).

Forward: one program per row computes h, rstd = 1/sqrt(mean(h^2) + eps) (saved, fp32) and y = h * rstd * w.
Backward: a fixed number of programs each walk a strided set of rows, computing
dh = rstd * (g - xhat * mean(g * xhat)) with g = dy * w, xhat = h * rstd (plus the gradient arriving on the
returned residual stream), and accumulate a per-program partial of dw = sum(dy * xhat) that is summed on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_fwd_kernel(
    X, R, H, Y, W, RSTD, stride_x, stride_r, N, eps,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(H + row * N + cols, h.to(H.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(
    H, W, RSTD, DY, DH, DX, DW_PART, M, N, stride_h,
    HAS_DH: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid, M, nprog):
        r64 = tl.cast(row, tl.int64)
        h = tl.load(H + r64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * N + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = h * rstd
        g = dy * w
        dh = rstd * (g - xhat * (tl.sum(g * xhat, 0) / N))
        if HAS_DH:
            dh += tl.load(DH + r64 * N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * N + cols, dh.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        shape = x.shape
        n = shape[-1]
        x2 = _rows(x)
        m = x2.shape[0]
        block = triton.next_power_of_2(n)
        warps = 1 if not x.is_cuda else min(max(block // 256, 1), 16)
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        if residual is not None:
            r2 = _rows(residual)
            h = torch.empty(m, n, dtype=torch.result_type(x, residual), device=x.device)
        else:
            r2, h = x2, x2
        _rms_fwd_kernel[(m,)](
            x2, r2, h, y, weight, rstd, x2.stride(0), r2.stride(0), n, eps,
            HAS_RES=residual is not None, BLOCK_N=block, num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(h, weight, rstd)
        ctx.meta = (shape, x.dtype, None if residual is None else residual.dtype, block, warps)
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        shape, x_dtype, r_dtype, block, warps = ctx.meta
        m, n = h.shape
        dy = dy.reshape(m, n).contiguous()
        has_dh = dh is not None
        dh = dh.reshape(m, n).contiguous() if has_dh else dy
        grad_dtype = h.dtype if r_dtype is not None else x_dtype
        dx = torch.empty(m, n, dtype=grad_dtype, device=h.device)
        nprog = min(m, torch.cuda.get_device_properties(h.device).multi_processor_count * 4 if h.is_cuda else 4)
        nprog = max(nprog, 1)
        dw_part = torch.empty(nprog, n, dtype=torch.float32, device=h.device)
        _rms_bwd_kernel[(nprog,)](
            h, weight, rstd, dy, dh, dx, dw_part, m, n, h.stride(0),
            HAS_DH=has_dh, BLOCK_N=block, num_warps=warps,
        )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype)
        dx = dx.view(shape)
        if r_dtype is None:
            return dx, dw, None, None
        return dx.to(x_dtype), dw, None, dx.to(r_dtype)


def rms_norm_triton(x, weight, eps, residual=None):
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps), residual)
