"""Plain-PyTorch implementations: the references the tests compare against, and the non-Triton paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back to x.dtype.

    With ``residual``: h = x + residual, returns (rms_norm(h), h).
    """
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_cos_sin(cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor):
    """Broadcast cos/sin ([seq, d], [batch, seq, d] or [batch*seq, d]) to q's [batch, seq, heads, d]."""
    b, s = q.shape[0], q.shape[1]
    if cos.dim() == 2 and cos.shape[0] == b * s and b > 1:
        cos, sin = cos.view(b, s, -1), sin.view(b, s, -1)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF Llama convention: x * cos + rotate_half(x) * sin, q/k: [batch, seq, heads, head_dim]."""
    c, s = _rope_cos_sin(cos, sin, q)
    q_out = (q * c.to(q.dtype) + rotate_half(q) * s.to(q.dtype)).to(q.dtype)
    k_out = (k * c.to(k.dtype) + rotate_half(k) * s.to(k.dtype)).to(k.dtype)
    return q_out, k_out


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def cross_entropy_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"):
    """The unfused reference: full fp32 logits, ``F.cross_entropy``."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )


# ---------------------------------------------------------------------------------------------------------------
# attention


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [n_docs+1] cumulative lengths -> [total] document index of every flattened token."""
    pos = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True).to(torch.int32)


def normalise_segments(q: torch.Tensor, k: torch.Tensor, cu_seqlens, segment_ids):
    """Return (segment_ids [batch, seq] or None, flatten) for the given document boundaries.

    cu_seqlens index the flattened batch*seq tokens, so with cu_seqlens the batch is flattened into one row
    (``flatten=True``); a document may then span a row boundary, exactly as flash-attn varlen reads it.
    Document boundaries need q and k of the same length (no KV cache).
    """
    if cu_seqlens is not None and segment_ids is not None:
        raise ValueError("give cu_seqlens or segment_ids, not both")
    b, s = q.shape[0], q.shape[1]
    if (cu_seqlens is not None or segment_ids is not None) and k.shape[1] != s:
        raise ValueError(f"document boundaries need q and k of the same length, got {s} and {k.shape[1]}")
    if cu_seqlens is not None:
        total = b * s
        if int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens[-1]={int(cu_seqlens[-1])} must equal batch*seq={total}")
        return segment_ids_from_cu_seqlens(cu_seqlens.to(q.device), total).view(1, total), True
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, s):
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != (batch, seq) {(b, s)}")
        return segment_ids.to(q.device), False
    return None, False


def attention_mask(segment_ids: torch.Tensor | None, sq: int, sk: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean [batch or 1, 1, sq, sk] mask (True = attend) from segment ids and causality.

    Causal is bottom-right aligned when sq != sk (query i sees keys j <= i + sk - sq), as flash-attn and a KV
    cache need.
    """
    mask = None
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)[None, None]
    if segment_ids is not None:
        same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _flatten(q, k, v, flatten):
    if not flatten:
        return q, k, v
    return tuple(t.reshape(1, t.shape[0] * t.shape[1], t.shape[2], t.shape[3]) for t in (q, k, v))


def attention_sdpa(q, k, v, *, causal=True, cu_seqlens=None, segment_ids=None, softmax_scale=None):
    """SDPA path: q [b, sq, h, d], k/v [b, sk, hkv, d] -> [b, sq, h, d], with a boolean document/causal mask."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"n_heads={h} must be a multiple of n_kv_heads={hkv}")
    seg, flatten = normalise_segments(q, k, cu_seqlens, segment_ids)
    qt, kt, vt = (t.transpose(1, 2) for t in _flatten(q, k, v, flatten))
    if hkv != h:
        kt = kt.repeat_interleave(h // hkv, dim=1)
        vt = vt.repeat_interleave(h // hkv, dim=1)
    if seg is None and (not causal or sq == sk):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=softmax_scale)
    else:
        mask = attention_mask(seg, qt.shape[2], kt.shape[2], causal, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2).reshape(b, sq, h, d)


def attention_ref(q, k, v, *, causal=True, cu_seqlens=None, segment_ids=None, softmax_scale=None):
    """Explicit softmax(QK^T * scale + mask) V in fp32: the test reference."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    seg, flatten = normalise_segments(q, k, cu_seqlens, segment_ids)
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    qt, kt, vt = (t.transpose(1, 2).float() for t in _flatten(q, k, v, flatten))
    kt = kt.repeat_interleave(h // hkv, dim=1)
    vt = vt.repeat_interleave(h // hkv, dim=1)
    scores = qt @ kt.transpose(-1, -2) * scale
    mask = attention_mask(seg, qt.shape[2], kt.shape[2], causal, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # a query with no visible key (only when sq > sk under causal) outputs 0, as flash-attn does
    out = torch.nan_to_num(scores.softmax(-1), nan=0.0) @ vt
    return out.transpose(1, 2).reshape(b, sq, h, d).to(q.dtype)
