"""Triton flash attention (forward + backward) with causal masking, GQA and packed-document masking.

Algorithm (FlashAttention-2): each program owns a block of queries for one (batch, head), streams key/value
blocks with an online softmax (running max ``m`` and sum ``l``, in base 2: scores are pre-multiplied by
scale * log2(e) so ``exp2`` is used), and stores O and the base-2 logsumexp L = m + log2(l) per row. Backward
recomputes P = exp2(S - L) block by block from the saved L: one kernel accumulates dQ per query block, another
accumulates dK/dV per key block over the query heads of its GQA group (no atomics).

Document masking: ``segment_ids`` [batch, seq]; query i attends key j only if seg[i] == seg[j] (and j <= i when
causal). Key blocks that cannot contain a token of any query's document are skipped: for every token we compute
the first/last position of its segment in its row, and each query block loops only over [min first, max last]
(and not past the diagonal when causal); each key block's dK/dV loop likewise covers only the query rows that
can see it. Segment ids need not be contiguous or sorted for correctness; contiguous packing makes the skipping
effective.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import cached_on

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST (set only under TRITON_INTERPRET for 16-bit inputs) multiplies in fp32 instead, because the
    interpreter multiplies the raw bit patterns of bfloat16 operands (triton-lang/triton#11584). Operands are
    still rounded to the input dtype first, as the GPU's MMA sees them."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, SEG, LO, HI,
    qk_scale, SQ, SK, causal_off, n_qblocks,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HKV)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < SQ
    d_valid = offs_d < D

    q_base = Q + b64 * SQ * H * D + h * D
    k_base = K + b64 * SK * HKV * D + hk * D
    v_base = V + b64 * SK * HKV * D + hk * D
    q = tl.load(
        q_base + offs_m[:, None] * (H * D) + offs_d[None, :], mask=m_valid[:, None] & d_valid[None, :], other=0.0
    )
    if HAS_SEG:
        seg_q = tl.load(SEG + b64 * SK + offs_m, mask=m_valid, other=-1)

    lo = tl.load(LO + b * n_qblocks + pid_m)
    hi = tl.load(HI + b * n_qblocks + pid_m)
    start = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < SK
        kt = tl.load(
            k_base + offs_n[None, :] * (HKV * D) + offs_d[:, None], mask=d_valid[:, None] & n_valid[None, :], other=0.0
        )
        qk = _dot(q, kt, PREC, UPCAST) * qk_scale
        mask = n_valid[None, :] & m_valid[:, None]
        if CAUSAL:
            mask = mask & (offs_m[:, None] + causal_off >= offs_n[None, :])
        if HAS_SEG:
            seg_k = tl.load(SEG + b64 * SK + offs_n, mask=n_valid, other=-2)
            mask = mask & (seg_q[:, None] == seg_k[None, :])
        qk = tl.where(mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * (HKV * D) + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    # rows with no visible key (only padding rows here) get L=+inf so backward's exp2(S - L) is exactly 0
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_base = Out + b64 * SQ * H * D + h * D
    tl.store(
        o_base + offs_m[:, None] * (H * D) + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * SQ + offs_m, lse, mask=m_valid)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, SEG, LO, HI,
    qk_scale, sm_scale, SQ, SK, causal_off, n_qblocks,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HKV)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < SQ
    d_valid = offs_d < D
    md_mask = m_valid[:, None] & d_valid[None, :]
    q_off = b64 * SQ * H * D + h * D + offs_m[:, None] * (H * D) + offs_d[None, :]
    k_base = K + b64 * SK * HKV * D + hk * D
    v_base = V + b64 * SK * HKV * D + hk * D

    q = tl.load(Q + q_off, mask=md_mask, other=0.0)
    do = tl.load(DO + q_off, mask=md_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * SQ + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * SQ + offs_m, mask=m_valid, other=0.0)
    if HAS_SEG:
        seg_q = tl.load(SEG + b64 * SK + offs_m, mask=m_valid, other=-1)

    lo = tl.load(LO + b * n_qblocks + pid_m)
    hi = tl.load(HI + b * n_qblocks + pid_m)
    start = (lo // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < SK
        dn_mask = d_valid[:, None] & n_valid[None, :]
        kt = tl.load(k_base + offs_n[None, :] * (HKV * D) + offs_d[:, None], mask=dn_mask, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * (HKV * D) + offs_d[:, None], mask=dn_mask, other=0.0)
        qk = _dot(q, kt, PREC, UPCAST) * qk_scale
        mask = n_valid[None, :] & m_valid[:, None]
        if CAUSAL:
            mask = mask & (offs_m[:, None] + causal_off >= offs_n[None, :])
        if HAS_SEG:
            seg_k = tl.load(SEG + b64 * SK + offs_n, mask=n_valid, other=-2)
            mask = mask & (seg_q[:, None] == seg_k[None, :])
        p = tl.where(mask, tl.exp2(qk - lse[:, None]), 0.0)
        dp = _dot(do, vt, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), PREC, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, SEG, LO, HI,
    qk_scale, sm_scale, SQ, SK, causal_off, n_kblocks,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    GROUP: tl.constexpr = H // HKV
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < SK
    d_valid = offs_d < D
    nd_mask = n_valid[:, None] & d_valid[None, :]
    kv_off = b64 * SK * HKV * D + hk * D + offs_n[:, None] * (HKV * D) + offs_d[None, :]
    k = tl.load(K + kv_off, mask=nd_mask, other=0.0)
    v = tl.load(V + kv_off, mask=nd_mask, other=0.0)
    if HAS_SEG:
        seg_k = tl.load(SEG + b64 * SK + offs_n, mask=n_valid, other=-2)

    lo = tl.load(LO + b * n_kblocks + pid_n)
    hi = tl.load(HI + b * n_kblocks + pid_n)
    start = (lo // BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b64 * SQ * H * D + h * D
        do_base = DO + b64 * SQ * H * D + h * D
        row_base = (b64 * H + h) * SQ
        for start_m in range(start, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < SQ
            dm_mask = d_valid[:, None] & m_valid[None, :]
            qt = tl.load(q_base + offs_m[None, :] * (H * D) + offs_d[:, None], mask=dm_mask, other=0.0)
            dot_ = tl.load(do_base + offs_m[None, :] * (H * D) + offs_d[:, None], mask=dm_mask, other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=m_valid, other=0.0)
            kq = _dot(k, qt, PREC, UPCAST) * qk_scale  # [BLOCK_N, BLOCK_M] = S^T
            mask = n_valid[:, None] & m_valid[None, :]
            if CAUSAL:
                mask = mask & (offs_m[None, :] + causal_off >= offs_n[:, None])
            if HAS_SEG:
                seg_q = tl.load(SEG + b64 * SK + offs_m, mask=m_valid, other=-1)
                mask = mask & (seg_k[:, None] == seg_q[None, :])
            pt = tl.where(mask, tl.exp2(kq - lse[None, :]), 0.0)
            dv += _dot(pt.to(dot_.dtype), tl.trans(dot_), PREC, UPCAST)
            dpt = _dot(v, dot_, PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(qt.dtype), tl.trans(qt), PREC, UPCAST)
    dk = dk * sm_scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=nd_mask)


# ---------------------------------------------------------------------------------------------------------------
# host side


def _segment_extent(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token, the first and last position (in its row) of a token with the same segment id."""
    bsz, s = seg.shape
    uniq, inv = torch.unique(seg, return_inverse=True)
    n_u = uniq.numel()
    key = (inv + torch.arange(bsz, device=seg.device)[:, None] * n_u).reshape(-1)
    pos = torch.arange(s, device=seg.device).expand(bsz, s).reshape(-1)
    first = torch.full((bsz * n_u,), s, device=seg.device, dtype=pos.dtype).scatter_reduce_(0, key, pos, "amin")
    last = torch.full((bsz * n_u,), -1, device=seg.device, dtype=pos.dtype).scatter_reduce_(0, key, pos, "amax")
    return first[key].view(bsz, s), last[key].view(bsz, s)


def _segment_meta(segment_ids: torch.Tensor, device) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    seg = segment_ids.to(device=device, dtype=torch.int32).contiguous()
    return seg, _segment_extent(seg)


def _block_reduce(x: torch.Tensor, block: int, op: str, pad_value: int) -> torch.Tensor:
    bsz, s = x.shape
    n = triton.cdiv(s, block)
    padded = torch.full((bsz, n * block), pad_value, device=x.device, dtype=x.dtype)
    padded[:, :s] = x
    padded = padded.view(bsz, n, block)
    return (padded.amin(-1) if op == "min" else padded.amax(-1)).to(torch.int32).contiguous()


def _q_block_ranges(extent, bsz: int, sq: int, sk: int, block_m: int, causal: bool, device):
    """Per query block: the key range [lo, hi) it must visit (causal is bottom-right aligned: query i sees keys
    j <= i + sk - sq, as flash-attn)."""
    n = triton.cdiv(sq, block_m)
    if extent is None:
        lo = torch.zeros(bsz, n, dtype=torch.int32, device=device)
        hi = torch.full((bsz, n), sk, dtype=torch.int32, device=device)
    else:
        lo = _block_reduce(extent[0], block_m, "min", sk)
        hi = _block_reduce(extent[1], block_m, "max", -1) + 1
    if causal:
        ends = torch.arange(1, n + 1, device=device) * block_m + (sk - sq)
        hi = torch.minimum(hi, ends.clamp(0, sk).to(torch.int32).expand(bsz, n))
    return lo.contiguous(), hi.contiguous(), n


def _k_block_ranges(extent, bsz: int, sq: int, sk: int, block_n: int, causal: bool, device):
    """Per key block: the query range [lo, hi) that can attend to it."""
    n = triton.cdiv(sk, block_n)
    if extent is None:
        lo = torch.zeros(bsz, n, dtype=torch.int32, device=device)
        hi = torch.full((bsz, n), sq, dtype=torch.int32, device=device)
    else:
        lo = _block_reduce(extent[0], block_n, "min", sq)
        hi = _block_reduce(extent[1], block_n, "max", -1) + 1
    if causal:
        starts = (torch.arange(n, device=device) * block_n - (sk - sq)).clamp(0, sq).to(torch.int32)
        lo = torch.maximum(lo, starts.expand(bsz, n))
    return lo.contiguous(), hi.contiguous(), n


def _config(d: int, device: torch.device, backward: bool, dtype: torch.dtype = torch.bfloat16):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Tiny blocks on CPU: the interpreter's cost grows with block area.

    On CUDA, 16-bit inputs use FA2-style tiles; fp32 tiles are smaller so the shared memory of the pipelined loads
    stays within an A100's 163 KiB (checked by ``python -m kiln.kernels.compile_check``).
    """
    if device.type != "cuda":
        return 16, 16, 1, 1
    warps = 4 if d <= 64 else 8
    if dtype == torch.float32:
        return (32, 32, warps, 2) if backward else (64, 32, warps, 2)
    if backward:
        return 64, 64, warps, 2
    return 128, 64, warps, 3


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, softmax_scale):
        bsz, sq, h, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        seg = extent = None
        if segment_ids is not None:
            seg, extent = cached_on(
                segment_ids, f"triton-extent-{q.device}", lambda: _segment_meta(segment_ids, q.device)
            )
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
        block_d = max(16, triton.next_power_of_2(d))
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        upcast = q.device.type == "cpu" and q.dtype != torch.float32
        bm, bn, warps, stages = _config(d, q.device, False, q.dtype)
        lo, hi, n_qb = _q_block_ranges(extent, bsz, sq, sk, bm, causal, q.device)
        o = torch.empty_like(q)
        lse = torch.empty(bsz, h, sq, dtype=torch.float32, device=q.device)
        seg_arg = seg if seg is not None else lo  # dummy pointer when HAS_SEG is False
        _attn_fwd_kernel[(n_qb, bsz * h)](
            q, k, v, o, lse, seg_arg, lo, hi, scale * LOG2E, sq, sk, sk - sq, n_qb,
            H=h, HKV=hkv, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            CAUSAL=causal, HAS_SEG=seg is not None, PREC=prec, UPCAST=upcast, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, seg)
        ctx.extent = extent
        ctx.causal = causal
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seg = ctx.saved_tensors
        bsz, sq, h, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [b, h, s]
        block_d = max(16, triton.next_power_of_2(d))
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        bm, bn, warps, stages = _config(d, q.device, True, q.dtype)
        seg_arg = seg if seg is not None else lse
        common = dict(
            H=h, HKV=hkv, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, CAUSAL=ctx.causal, HAS_SEG=seg is not None,
            PREC=prec, UPCAST=q.device.type == "cpu" and q.dtype != torch.float32, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        dq = torch.empty_like(q)
        lo, hi, n_qb = _q_block_ranges(ctx.extent, bsz, sq, sk, bm, ctx.causal, q.device)
        _attn_bwd_dq_kernel[(n_qb, bsz * h)](
            q, k, v, do, dq, lse, delta, seg_arg, lo, hi, ctx.scale * LOG2E, ctx.scale, sq, sk, sk - sq, n_qb, **common
        )
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        lo, hi, n_kb = _k_block_ranges(ctx.extent, bsz, sq, sk, bn, ctx.causal, q.device)
        _attn_bwd_dkdv_kernel[(n_kb, bsz * hkv)](
            q, k, v, do, dk, dv, lse, delta, seg_arg, lo, hi,
            ctx.scale * LOG2E, ctx.scale, sq, sk, sk - sq, n_kb, **common,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


def flash_attention_triton(q, k, v, segment_ids=None, causal=True, softmax_scale=None):
    """q [b, sq, h, d], k/v [b, sk, hkv, d], segment_ids [b, s] (needs sq == sk) or None -> [b, sq, h, d]
    (differentiable). With sq != sk, causal is bottom-right aligned (query i sees keys j <= i + sk - sq)."""
    if segment_ids is not None and q.shape[1] != k.shape[1]:
        raise ValueError("segment_ids need q and k of the same length")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"n_heads={q.shape[2]} must be a multiple of n_kv_heads={k.shape[2]}")
    return _FlashAttention.apply(q, k, v, segment_ids, causal, softmax_scale)
