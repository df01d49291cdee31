"""Attention dispatch: flash-attn varlen (GPU, when installed) -> our Triton flash attention -> SDPA.

Layout everywhere: q [batch, seq, n_heads, head_dim], k/v [batch, seq, n_kv_heads, head_dim] (GQA when
n_kv_heads < n_heads; q head i reads kv head i // (n_heads // n_kv_heads), as HF ``repeat_kv``). Document
boundaries come either as ``segment_ids`` [batch, seq] (a token attends only to tokens of its own row with the
same id) or as flash-attn style ``cu_seqlens`` int32 [n_docs+1] over the flattened batch*seq tokens.

Without document boundaries k/v may be longer than q (a KV cache: q [batch, s_q, ...], k/v [batch, s_k, ...]);
causal masking is then bottom-right aligned (query i sees keys j <= i + s_k - s_q), as in flash-attn.

The flash path turns segment_ids into cu_seqlens (a new document at every id change), so it assumes each
document is one contiguous run of its row; the Triton and SDPA paths compare ids and do not need that.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ._dispatch import cached_on, log_once, triton_usable
from .reference import attention_sdpa, normalise_segments

BACKENDS = ("auto", "flash", "triton", "sdpa", "torch")  # "torch" is an alias of "sdpa"


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_ok(q: torch.Tensor) -> tuple[bool, str]:
    if not q.is_cuda:
        return False, f"flash-attn needs CUDA, tensors are on {q.device.type}"
    if not flash_attn_available():
        return False, "flash_attn not installed"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"flash-attn needs fp16/bf16, got {q.dtype}"
    return True, ""


def select_backend(backend: str, q: torch.Tensor) -> str:
    """Resolve ``backend`` to the path that will run for ``q`` ("flash" | "triton" | "sdpa"), logging it once."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend in ("sdpa", "torch"):
        log_once("attention", "sdpa", "requested")
        return "sdpa"
    if backend in ("auto", "flash"):
        ok, why = _flash_ok(q)
        if ok:
            log_once("attention", "flash", "flash_attn_varlen_func")
            return "flash"
        if backend == "flash":
            why = f"flash requested but unavailable: {why}"
        if q.is_cuda and triton_usable(q):
            log_once("attention", "triton", why)
            return "triton"
        if backend == "auto":
            log_once("attention", "sdpa", f"auto on {q.device.type}")
            return "sdpa"
        log_once("attention", "sdpa", why)
        return "sdpa"
    # backend == "triton"
    if triton_usable(q):
        log_once("attention", "triton", "requested")
        return "triton"
    log_once("attention", "sdpa", f"triton requested but unavailable on {q.device.type} (TRITON_INTERPRET=1 on CPU)")
    return "sdpa"


def _cu_seqlens_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[batch, seq] segment ids -> int32 cu_seqlens over the flattened tokens (a new doc at every id change
    and at every row start), and the longest document. Assumes each document is contiguous within its row."""
    b, s = segment_ids.shape
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = change.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _attention_flash(q, k, v, causal, cu_seqlens, max_seqlen, segment_ids, softmax_scale):
    from flash_attn import flash_attn_varlen_func

    b, sq, h, d = q.shape
    sk = k.shape[1]
    if cu_seqlens is None and segment_ids is not None:
        cu_seqlens, max_seqlen = cached_on(
            segment_ids, f"cu_seqlens-{q.device}", lambda: _cu_seqlens_from_segments(segment_ids.to(q.device))
        )
    if cu_seqlens is not None:
        cu_q = cu_k = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_q[1:] - cu_q[:-1]).max())
        max_q = max_k = max_seqlen
    else:  # one document per row; sq != sk (KV cache) is fine here, causal is bottom-right aligned
        cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=q.device)
        max_q, max_k = sq, sk
    out = flash_attn_varlen_func(
        q.reshape(b * sq, h, d),
        k.reshape(b * sk, k.shape[2], d),
        v.reshape(b * sk, v.shape[2], d),
        cu_q,
        cu_k,
        max_q,
        max_k,
        softmax_scale=softmax_scale,
        causal=causal,
    )
    return out.reshape(b, sq, h, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    segment_ids: torch.Tensor | None = None,
    backend: str = "auto",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over packed documents; returns [batch, seq, n_heads, head_dim].

    backend "auto": flash-attn on CUDA if importable (and fp16/bf16), else Triton on CUDA, else SDPA;
    "flash" / "triton" fall back (flash -> triton on CUDA -> sdpa) with one log line when unavailable.
    ``max_seqlen`` (longest document) is only read by the flash path; it is computed when not given.
    ``softmax_scale`` defaults to head_dim ** -0.5.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, seq, heads, head_dim]")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"n_heads={q.shape[2]} must be a multiple of n_kv_heads={k.shape[2]}")
    if (cu_seqlens is not None or segment_ids is not None) and k.shape[1] != q.shape[1]:
        raise ValueError(f"document boundaries need q and k of the same length, got {q.shape[1]} and {k.shape[1]}")
    path = select_backend(backend, q)
    if path == "flash":
        return _attention_flash(q, k, v, causal, cu_seqlens, max_seqlen, segment_ids, softmax_scale)
    if path == "triton":
        from ._triton_attention import flash_attention_triton

        seg, flatten = normalise_segments(q, k, cu_seqlens, segment_ids)
        b, sq, h, d = q.shape
        if flatten:
            q, k, v = (t.reshape(1, b * sq, t.shape[2], d) for t in (q, k, v))
        out = flash_attention_triton(q, k, v, seg, causal, softmax_scale)
        return out.reshape(b, sq, h, d)
    return attention_sdpa(
        q, k, v, causal=causal, cu_seqlens=cu_seqlens, segment_ids=segment_ids, softmax_scale=softmax_scale
    )
