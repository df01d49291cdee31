"""Cross-entropy that never materialises the full fp32 copy of the logits.

Torch path: an autograd.Function that walks row chunks; each chunk is upcast to fp32, its logsumexp and the
loss computed, and only the per-row logsumexp ([rows] fp32) is saved. Backward recomputes softmax chunk by chunk
and writes the gradient in the logits' dtype.
Triton path: one program per row streams over the vocab in blocks with an online (max, sum-exp) logsumexp;
backward recomputes exp(x - lse) block by block.
"""

from __future__ import annotations

import torch

from ._dispatch import resolve

# rows per chunk on the torch path: the fp32 temporary is at most CHUNK_ROWS x vocab
CHUNK_ROWS = 4096


def _check(logits: torch.Tensor, labels: torch.Tensor, reduction: str):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean | sum | none, got {reduction!r}")
    x = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"logits rows {x.shape[0]} != labels {y.shape[0]}")
    return x if x.stride(-1) == 1 else x.contiguous(), y


def _reduce(losses: torch.Tensor, n_valid: torch.Tensor, reduction: str, out_shape):
    if reduction == "none":
        return losses.view(out_shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / n_valid.clamp(min=1).to(total.dtype)


def _grad_scale(grad_out: torch.Tensor, n_valid: torch.Tensor, reduction: str, n_rows: int) -> torch.Tensor:
    """Per-row upstream gradient (fp32, [rows])."""
    if reduction == "none":
        return grad_out.reshape(-1).float()
    g = grad_out.float()
    if reduction == "mean":
        g = g / n_valid.clamp(min=1).float()
    return g.expand(n_rows)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, ignore_index, reduction, out_shape):
        n = x.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        losses = torch.zeros(n, dtype=torch.float32, device=x.device)
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            xc = x[s:e].float()
            lse[s:e] = torch.logsumexp(xc, dim=-1)
            picked = xc.gather(1, safe_y[s:e, None]).squeeze(1)
            losses[s:e] = torch.where(valid[s:e], lse[s:e] - picked, torch.zeros_like(picked))
        n_valid = valid.sum()
        ctx.save_for_backward(x, safe_y, valid, lse, n_valid)
        ctx.reduction = reduction
        return _reduce(losses, n_valid, reduction, out_shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, safe_y, valid, lse, n_valid = ctx.saved_tensors
        n = x.shape[0]
        g = _grad_scale(grad_out, n_valid, ctx.reduction, n) * valid.float()
        dx = torch.empty_like(x)
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            # softmax - onehot, scaled: one fp32 chunk, updated in place (written straight into dx when fp32)
            p = dx[s:e] if x.dtype == torch.float32 else torch.empty(e - s, x.shape[1], device=x.device)
            torch.sub(x[s:e], lse[s:e, None], out=p)
            p.exp_()
            p.scatter_add_(1, safe_y[s:e, None], p.new_full((e - s, 1), -1.0))
            p.mul_(g[s:e, None])
            if p.data_ptr() != dx[s:e].data_ptr():
                dx[s:e].copy_(p)
        return dx, None, None, None, None


def cross_entropy_torch(logits, labels, ignore_index=-100, reduction="mean"):
    x, y = _check(logits, labels, reduction)
    return _ChunkedCrossEntropy.apply(x, y, ignore_index, reduction, labels.shape)


def cross_entropy(logits, labels, ignore_index=-100, reduction="mean", backend="auto"):
    """Mean/sum/none token cross-entropy of ``logits`` [..., vocab] against ``labels`` [...].

    Rows whose label is ``ignore_index`` contribute 0 and are excluded from the mean. Computed in fp32 one
    chunk at a time; the full fp32 logits are never built.
    """
    path = resolve("cross_entropy", backend, logits)
    if path == "triton":
        from ._triton_ce import cross_entropy_triton

        return cross_entropy_triton(logits, labels, ignore_index, reduction)
    return cross_entropy_torch(logits, labels, ignore_index, reduction)
