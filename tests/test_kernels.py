"""kernels/: every entry point, forward and backward, against a plain-PyTorch reference (fp32, small shapes).

The Triton kernels run on CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set below before anything
can import triton). ``KILN_KERNEL_TEST_DEVICE=cuda`` runs the same tests, with the same assertions, on the GPU
instead: compiled Triton (no interpreter), every tensor the tests create allocated on CUDA, fp32 and bf16, forward
and backward (``benchmarks/gpu_suite.sh`` does this); the three tests of the CPU dispatch (auto picks the torch
path, triton falls back without the interpreter) are skipped there. Tolerances (fp32, absolute / relative,
``torch.testing.assert_close``):

| kernel                         | forward          | backward         | why not exact                                  |
|--------------------------------|------------------|------------------|------------------------------------------------|
| attention (triton, sdpa)       | 2e-5 / 1e-4      | 5e-5 / 1e-4      | online softmax + blockwise sums reorder adds   |
| rms_norm (+ residual)          | 1e-5 / 1e-5      | 2e-5 / 1e-5      | rstd and the dw row-sum are summed differently |
| apply_rope                     | 1e-6 / 1e-6      | 1e-6 / 1e-6      | same elementwise ops (observed: bit-exact)     |
| swiglu                         | 1e-6 / 1e-5      | 1e-6 / 1e-5      | sigmoid vs torch silu                          |
| cross_entropy (triton, torch)  | 1e-5 / 1e-5      | 1e-6 / 1e-5      | online logsumexp over vocab blocks             |

Observed errors are ~1e-7 to 2e-6 in every case; the tolerances leave headroom without hiding a wrong mask (a
wrong mask or a missing GQA group moves outputs by O(0.1)).
"""

from __future__ import annotations

import os

# "cpu" (default): the interpreter; "cuda": compiled Triton on the GPU (benchmarks/gpu_suite.sh).
DEVICE = os.environ.get("KILN_KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
elif DEVICE == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)
else:
    raise RuntimeError(f"KILN_KERNEL_TEST_DEVICE must be cpu or cuda, got {DEVICE!r}")

import contextlib  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kiln import kernels  # noqa: E402
from kiln.kernels import _cross_entropy as ce_mod  # noqa: E402
from kiln.kernels import _dispatch  # noqa: E402
from kiln.kernels._attention import _cu_seqlens_from_segments, select_backend  # noqa: E402
from kiln.kernels.reference import (  # noqa: E402
    apply_rope_ref,
    attention_ref,
    cross_entropy_ref,
    rms_norm_ref,
    segment_ids_from_cu_seqlens,
    swiglu_ref,
)

if DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("KILN_KERNEL_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
# the tests of the CPU dispatch (auto -> torch path, triton -> fallback without the interpreter)
cpu_dispatch = pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU dispatch; KILN_KERNEL_TEST_DEVICE=cuda")

ATTN_FWD = dict(atol=2e-5, rtol=1e-4)
ATTN_BWD = dict(atol=5e-5, rtol=1e-4)
NORM_FWD = dict(atol=1e-5, rtol=1e-5)
NORM_BWD = dict(atol=2e-5, rtol=1e-5)
ROPE_TOL = dict(atol=1e-6, rtol=1e-6)
SWIGLU_TOL = dict(atol=1e-6, rtol=1e-5)
CE_FWD = dict(atol=1e-5, rtol=1e-5)
CE_BWD = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # on the GPU, every tensor a test creates (randn, tensor, arange, ...) is allocated on CUDA
    with torch.device(DEVICE) if DEVICE != "cpu" else contextlib.nullcontext():
        yield


def _grads(outs, inputs, grad_outs):
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, inputs, grad_outs)


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_()


# ---------------------------------------------------------------------------------------------------------------
# public API


def test_public_signatures_match_contract():
    assert set(kernels.__all__) == {"attention", "rms_norm", "apply_rope", "swiglu", "cross_entropy"}
    sig = inspect.signature(kernels.attention)
    for name, default in [("causal", True), ("cu_seqlens", None), ("max_seqlen", None), ("segment_ids", None)]:
        assert sig.parameters[name].default is default
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["backend"].default == "auto"
    assert list(inspect.signature(kernels.rms_norm).parameters) == ["x", "weight", "eps", "residual", "backend"]
    assert list(inspect.signature(kernels.apply_rope).parameters) == ["q", "k", "cos", "sin", "backend"]
    assert list(inspect.signature(kernels.swiglu).parameters) == ["gate", "up", "backend"]
    ce = inspect.signature(kernels.cross_entropy).parameters
    assert list(ce) == ["logits", "labels", "ignore_index", "reduction", "backend"]
    assert ce["ignore_index"].default == -100 and ce["reduction"].default == "mean"


# ---------------------------------------------------------------------------------------------------------------
# attention

B, S, H, HKV, D = 2, 40, 4, 2, 16
# three packed documents in row 0 (lengths 7, 20, 13), two in row 1
SEGMENTS = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [3] * 17 + [4] * 23]).to(DEVICE)
# the same boundaries over the flattened batch, plus a document crossing the row boundary (flash varlen style)
CU_SEQLENS = torch.tensor([0, 5, 30, 47, 80], dtype=torch.int32).to(DEVICE)


def _qkv(b=B, s=S, h=H, hkv=HKV, d=D):
    return _leaf(b, s, h, d), _leaf(b, s, hkv, d), _leaf(b, s, hkv, d)


def _check_attention(backend, causal, docs, shape=(B, S, H, HKV, D)):
    q, k, v = _qkv(*shape)
    kw = {"segment_ids": SEGMENTS} if docs == "segment_ids" else {"cu_seqlens": CU_SEQLENS} if docs == "cu" else {}
    out = kernels.attention(q, k, v, causal=causal, backend=backend, **kw)
    ref = attention_ref(q, k, v, causal=causal, **kw)
    torch.testing.assert_close(out, ref, **ATTN_FWD)
    do = torch.randn_like(out)
    for got, want in zip(_grads(out, (q, k, v), do), _grads(ref, (q, k, v), do)):
        torch.testing.assert_close(got, want, **ATTN_BWD)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("docs", [None, "segment_ids", "cu"])
def test_attention_triton_matches_reference(causal, docs):
    """GQA (4 q heads on 2 kv heads), 3 packed documents in a row, fwd + bwd; seq 40 is not a block multiple."""
    _check_attention("triton", causal, docs)


@pytest.mark.parametrize("h,hkv,d", [(2, 2, 24), (4, 1, 32)])
def test_attention_triton_mha_mqa_and_odd_head_dim(h, hkv, d):
    _check_attention("triton", True, "segment_ids", shape=(B, S, h, hkv, d))


def test_attention_triton_non_contiguous_segments():
    """An id that reappears later in the row (and unsorted ids) is still one document: block skipping must not
    drop its earlier tokens."""
    seg = torch.tensor([[2] * 10 + [0] * 14 + [2] * 8 + [1] * 8, [0] * 5 + [1] * 30 + [0] * 5])
    for causal in (True, False):
        q, k, v = _qkv()
        out = kernels.attention(q, k, v, causal=causal, segment_ids=seg, backend="triton")
        ref = attention_ref(q, k, v, causal=causal, segment_ids=seg)
        torch.testing.assert_close(out, ref, **ATTN_FWD)
        do = torch.randn_like(out)
        for got, want in zip(_grads(out, (q, k, v), do), _grads(ref, (q, k, v), do)):
            torch.testing.assert_close(got, want, **ATTN_BWD)


def test_attention_masks_really_isolate_documents():
    """Changing document 0's keys/values must not change any other document's outputs (and must change doc 0's)."""
    q, k, v = (t.detach() for t in _qkv())
    out = kernels.attention(q, k, v, segment_ids=SEGMENTS, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[0, :7] += 3.0
    v2[0, :7] -= 2.0
    out2 = kernels.attention(q, k2, v2, segment_ids=SEGMENTS, backend="triton")
    torch.testing.assert_close(out2[0, 7:], out[0, 7:], atol=0, rtol=0)
    torch.testing.assert_close(out2[1], out[1], atol=0, rtol=0)
    assert (out2[0, :7] - out[0, :7]).abs().max() > 0.1


@pytest.mark.parametrize("docs", [None, "segment_ids", "cu"])
def test_attention_sdpa_matches_reference(docs):
    _check_attention("sdpa", True, docs)


def test_attention_softmax_scale():
    q, k, v = (t.detach() for t in _qkv())
    for backend in ("triton", "sdpa"):
        out = kernels.attention(q, k, v, segment_ids=SEGMENTS, backend=backend, softmax_scale=0.3)
        torch.testing.assert_close(out, attention_ref(q, k, v, segment_ids=SEGMENTS, softmax_scale=0.3), **ATTN_FWD)


def test_cu_seqlens_segment_conversions():
    seg = segment_ids_from_cu_seqlens(CU_SEQLENS, 80)
    assert seg.tolist() == [0] * 5 + [1] * 25 + [2] * 17 + [3] * 33
    cu, max_len = _cu_seqlens_from_segments(SEGMENTS)
    # a new document starts at every id change and at every row start
    assert cu.tolist() == [0, 7, 27, 40, 57, 80] and cu.dtype == torch.int32 and max_len == 23


@cpu_dispatch
def test_attention_auto_on_cpu_picks_sdpa_and_equals_triton(caplog):
    q, k, v = (t.detach() for t in _qkv())
    _dispatch._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="kiln.kernels"):
        assert select_backend("auto", q) == "sdpa"
        auto = kernels.attention(q, k, v, segment_ids=SEGMENTS)
        kernels.attention(q, k, v, segment_ids=SEGMENTS)
        triton_out = kernels.attention(q, k, v, segment_ids=SEGMENTS, backend="triton")
    torch.testing.assert_close(auto, triton_out, **ATTN_FWD)
    lines = [r.getMessage() for r in caplog.records if r.name == "kiln.kernels"]
    assert sum("attention runs the sdpa path" in m for m in lines) == 1, lines  # logged once, not per call
    assert sum("attention runs the triton path" in m for m in lines) == 1, lines


@cpu_dispatch
def test_attention_fallbacks(caplog, monkeypatch):
    q, k, v = (t.detach() for t in _qkv())
    ref = attention_ref(q, k, v, segment_ids=SEGMENTS)
    _dispatch._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="kiln.kernels"):
        # flash-attn needs CUDA: falls back to SDPA on CPU and says why
        assert select_backend("flash", q) == "sdpa"
        torch.testing.assert_close(kernels.attention(q, k, v, segment_ids=SEGMENTS, backend="flash"), ref, **ATTN_FWD)
        # triton on CPU without the interpreter is unusable: falls back to SDPA
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert select_backend("triton", q) == "sdpa"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError):
        kernels.attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError):
        kernels.attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_triton(with_residual):
    n = 48  # not a power of two: exercises the column mask
    x, res = _leaf(2, 5, n), _leaf(2, 5, n)
    w = (torch.rand(n) + 0.5).requires_grad_()
    if with_residual:
        y, h = kernels.rms_norm(x, w, 1e-6, residual=res, backend="triton")
        y_ref, h_ref = rms_norm_ref(x, w, 1e-6, res)
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
        outs, refs, inputs = (y, h), (y_ref, h_ref), (x, w, res)
    else:
        y = kernels.rms_norm(x, w, 1e-6, backend="triton")
        y_ref = rms_norm_ref(x, w, 1e-6)
        outs, refs, inputs = y, y_ref, (x, w)
    torch.testing.assert_close(y, y_ref, **NORM_FWD)
    torch.testing.assert_close(y_ref, F.rms_norm(x + res if with_residual else x, (n,), w, 1e-6), **NORM_FWD)
    gouts = tuple(torch.randn_like(t) for t in (outs if isinstance(outs, tuple) else (outs,)))
    for got, want in zip(_grads(outs, inputs, gouts), _grads(refs, inputs, gouts)):
        torch.testing.assert_close(got, want, **NORM_BWD)


def test_rms_norm_many_rows_dw_reduction():
    """More rows than backward programs: each program accumulates a strided set of rows into its dw partial."""
    x, w = _leaf(37, 16), (torch.rand(16) + 0.5).requires_grad_()
    y = kernels.rms_norm(x, w, 1e-5, backend="triton")
    dy = torch.randn_like(y)
    for got, want in zip(_grads(y, (x, w), dy), _grads(F.rms_norm(x, (16,), w, 1e-5), (x, w), dy)):
        torch.testing.assert_close(got, want, **NORM_BWD)


def test_rms_norm_torch_path_matches_functional():
    x, res, w = torch.randn(3, 32), torch.randn(3, 32), torch.rand(32)
    y, h = kernels.rms_norm(x, w, 1e-6, residual=res, backend="torch")
    torch.testing.assert_close(h, x + res)
    torch.testing.assert_close(y, F.rms_norm(x + res, (32,), w, 1e-6), **NORM_FWD)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), F.rms_norm(x, (32,), w, 1e-6), **NORM_FWD)


# ---------------------------------------------------------------------------------------------------------------
# RoPE


def _llama_cos_sin(positions: torch.Tensor, d: int, base: float = 10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("layout", ["seq", "batch*seq", "batch,seq"])
def test_rope_triton_matches_reference(layout):
    b, s, d = 2, 6, 16
    q, k = _leaf(b, s, 4, d), _leaf(b, s, 2, d)
    # positions restarting at each packed document, as [batch*seq, d] or [batch, seq, d] (pretrain/model.py)
    per_row = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    pos = {"seq": torch.arange(s), "batch*seq": per_row.reshape(-1), "batch,seq": per_row}[layout]
    cos, sin = _llama_cos_sin(pos, d)
    out = kernels.apply_rope(q, k, cos, sin, backend="triton")
    ref = apply_rope_ref(q, k, cos, sin)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, **ROPE_TOL)
    gouts = (torch.randn_like(q), torch.randn_like(k))
    for got, want in zip(_grads(out, (q, k), gouts), _grads(ref, (q, k), gouts)):
        torch.testing.assert_close(got, want, **ROPE_TOL)


def test_rope_non_contiguous_input():
    """q/k sliced out of a fused qkv projection (strided views) give the same result as contiguous copies."""
    qkv = torch.randn(2, 6, 8, 16)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    cos, sin = _llama_cos_sin(torch.arange(6), 16)
    out = kernels.apply_rope(q, k, cos, sin, backend="triton")
    for got, want in zip(out, apply_rope_ref(q.contiguous(), k.contiguous(), cos, sin)):
        torch.testing.assert_close(got, want, **ROPE_TOL)


def test_rope_reference_is_hf_llama_convention():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = torch.randn(2, 6, 4, 16), torch.randn(2, 6, 2, 16)
    cos, sin = _llama_cos_sin(torch.arange(6), 16)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, cos[None], sin[None], unsqueeze_dim=2)
    ours = kernels.apply_rope(q, k, cos, sin, backend="triton")
    torch.testing.assert_close(ours[0], hf_q, **ROPE_TOL)
    torch.testing.assert_close(ours[1], hf_k, **ROPE_TOL)


def test_rope_scores_depend_only_on_relative_position():
    d = 16
    q1, k1 = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(pq, pk):
        cq, sq = _llama_cos_sin(torch.tensor([pq]), d)
        ck, sk = _llama_cos_sin(torch.tensor([pk]), d)
        rq, _ = kernels.apply_rope(q1, k1, cq, sq, backend="triton")
        _, rk = kernels.apply_rope(q1, k1, ck, sk, backend="triton")
        return (rq * rk).sum()

    assert math.isclose(score(5, 2), score(13, 10), rel_tol=1e-5, abs_tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU


def test_swiglu_triton_matches_reference():
    gate, up = _leaf(3, 7, 50, scale=3.0), _leaf(3, 7, 50)
    out = kernels.swiglu(gate, up, backend="triton")
    ref = swiglu_ref(gate, up)
    torch.testing.assert_close(out, ref, **SWIGLU_TOL)
    torch.testing.assert_close(ref, gate * torch.sigmoid(gate) * up, **SWIGLU_TOL)
    do = torch.randn_like(out)
    for got, want in zip(_grads(out, (gate, up), do), _grads(ref, (gate, up), do)):
        torch.testing.assert_close(got, want, **SWIGLU_TOL)


# ---------------------------------------------------------------------------------------------------------------
# cross-entropy


def _labels(shape, vocab):
    labels = torch.randint(0, vocab, shape)
    labels.view(-1)[::3] = -100  # every third token ignored
    return labels


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_reference(backend, reduction, monkeypatch):
    vocab = 1500  # > one vocab block on the interpreter (1024) and not a multiple of it
    monkeypatch.setattr(ce_mod, "CHUNK_ROWS", 7)  # torch path: several row chunks, the last one partial
    logits = _leaf(4, 5, vocab, scale=3.0)
    labels = _labels((4, 5), vocab)
    out = kernels.cross_entropy(logits, labels, reduction=reduction, backend=backend)
    ref = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=-100, reduction=reduction)
    if reduction == "none":
        ref = ref.view(4, 5)
    torch.testing.assert_close(out, ref, **CE_FWD)
    g = torch.randn_like(out)
    got, want = _grads(out, (logits,), g)[0], _grads(ref, (logits,), g)[0]
    torch.testing.assert_close(got, want, **CE_BWD)
    assert got.view(-1, vocab)[::3].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cross_entropy_custom_ignore_index_and_all_ignored(backend):
    logits, labels = _leaf(6, 40), torch.randint(0, 40, (6,))
    labels[[1, 4]] = 7
    out = kernels.cross_entropy(logits, labels, ignore_index=7, backend=backend)
    torch.testing.assert_close(out, cross_entropy_ref(logits, labels, ignore_index=7), **CE_FWD)
    # every token ignored: loss 0 and zero gradient (F.cross_entropy's mean would be nan)
    out = kernels.cross_entropy(logits, torch.full((6,), -100), backend=backend)
    (grad,) = torch.autograd.grad(out, logits)
    assert out.item() == 0.0 and grad.abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cross_entropy_saves_no_fp32_logits(backend):
    """bf16 logits: autograd keeps only the bf16 logits and per-row vectors, never an fp32 [rows, vocab] copy;
    the gradient comes back in bf16 and matches the fp32 reference to bf16 precision."""
    rows, vocab = 8, 300
    logits = (torch.randn(rows, vocab) * 2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (rows,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = kernels.cross_entropy(logits, labels, backend=backend)
    assert not any(t.dtype == torch.float32 and t.numel() >= rows * vocab for t in saved)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.dtype == torch.bfloat16
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits, labels)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad, atol=1e-4, rtol=1e-2)


@cpu_dispatch
def test_pointwise_auto_on_cpu_uses_torch_and_triton_request_falls_back(caplog, monkeypatch):
    x, w = torch.randn(4, 32), torch.rand(32)
    _dispatch._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="kiln.kernels"):
        assert _dispatch.resolve("rms_norm", "auto", x) == "torch"
        assert _dispatch.resolve("rms_norm", "triton", x) == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert _dispatch.resolve("swiglu", "triton", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm(x, w, 1e-6, backend="triton"))
    msgs = [r.getMessage() for r in caplog.records]
    assert any("swiglu runs the torch path" in m and "unavailable" in m for m in msgs), msgs
    with pytest.raises(ValueError):
        kernels.swiglu(x, x, backend="cuda")


@pytest.mark.parametrize("sq,sk,causal", [(1, 9, False), (1, 9, True), (5, 21, True), (5, 21, False)])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_attention_kv_cache_shapes(sq, sk, causal, backend):
    """k/v longer than q (decoding with a KV cache): causal is bottom-right aligned, as in flash-attn."""
    q, k, v = _leaf(2, sq, 4, 16), _leaf(2, sk, 2, 16), _leaf(2, sk, 2, 16)
    out = kernels.attention(q, k, v, causal=causal, backend=backend)
    ref = attention_ref(q, k, v, causal=causal)
    if causal and sq == 1:  # the last query sees every key
        torch.testing.assert_close(ref, attention_ref(q, k, v, causal=False), **ATTN_FWD)
    torch.testing.assert_close(out, ref, **ATTN_FWD)
    do = torch.randn_like(out)
    for got, want in zip(_grads(out, (q, k, v), do), _grads(ref, (q, k, v), do)):
        torch.testing.assert_close(got, want, **ATTN_BWD)
    with pytest.raises(ValueError):
        kernels.attention(q, k, v, segment_ids=torch.zeros(2, sq, dtype=torch.long), backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# bf16 (what training runs in). The interpreter cannot multiply bfloat16 in tl.dot (triton-lang/triton#11584), so
# under it the attention kernels upcast the (already bf16-rounded) dot operands to fp32; loads, stores and the
# bf16 rounding of P and dS are exercised as on the GPU. Tolerances: bf16 has 8 mantissa bits (~4e-3 relative).
BF16_ATTN = dict(atol=3e-2, rtol=2e-2)
BF16_ATTN_BWD = dict(atol=8e-2, rtol=2e-2)
BF16_EW = dict(atol=2e-2, rtol=1e-2)


def test_attention_triton_bf16_against_fp32_reference():
    q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in _qkv())
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = kernels.attention(q, k, v, segment_ids=SEGMENTS, backend="triton")
    ref = attention_ref(qf, kf, vf, segment_ids=SEGMENTS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, **BF16_ATTN)
    do = torch.randn_like(ref)
    got = _grads(out, (q, k, v), do.to(torch.bfloat16))
    want = _grads(ref, (qf, kf, vf), do)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, **BF16_ATTN_BWD)


def test_pointwise_kernels_bf16_against_fp32_reference():
    bf = torch.bfloat16
    x, res, w = torch.randn(3, 8, 48, dtype=bf), torch.randn(3, 8, 48, dtype=bf), torch.rand(48, dtype=bf) + 0.5
    y, h = kernels.rms_norm(x, w, 1e-6, residual=res, backend="triton")
    y_ref, h_ref = rms_norm_ref(x.float(), w.float(), 1e-6, res.float())
    assert y.dtype == bf and h.dtype == bf
    torch.testing.assert_close(y.float(), y_ref, **BF16_EW)
    torch.testing.assert_close(h.float(), h_ref, **BF16_EW)

    q, k = torch.randn(2, 6, 4, 16, dtype=bf), torch.randn(2, 6, 2, 16, dtype=bf)
    cos, sin = _llama_cos_sin(torch.arange(6), 16)
    rq, rk = kernels.apply_rope(q, k, cos.to(bf), sin.to(bf), backend="triton")
    fq, fk = apply_rope_ref(q.float(), k.float(), cos, sin)
    torch.testing.assert_close(rq.float(), fq, **BF16_EW)
    torch.testing.assert_close(rk.float(), fk, **BF16_EW)

    gate, up = torch.randn(4, 64, dtype=bf), torch.randn(4, 64, dtype=bf)
    torch.testing.assert_close(
        kernels.swiglu(gate, up, backend="triton").float(), swiglu_ref(gate.float(), up.float()), **BF16_EW
    )

    logits, labels = (torch.randn(6, 300) * 3).to(bf), _labels((6,), 300)
    torch.testing.assert_close(
        kernels.cross_entropy(logits, labels, backend="triton"), cross_entropy_ref(logits, labels), **CE_FWD
    )


def test_segment_metadata_is_memoised_per_tensor():
    """Every layer of a step passes the same segment_ids tensor: its document extents are computed once; a new
    tensor or an in-place change recomputes them."""
    calls = []
    seg = SEGMENTS.clone()
    for _ in range(3):
        _dispatch.cached_on(seg, "test", lambda: calls.append(1) or len(calls))
    assert len(calls) == 1
    seg[0, 0] = 9  # in-place edit bumps the version counter
    assert _dispatch.cached_on(seg, "test", lambda: calls.append(1) or len(calls)) == 2
    other = SEGMENTS.clone()
    assert _dispatch.cached_on(other, "test", lambda: calls.append(1) or len(calls)) == 3
    # and the attention results stay right when the ids change in place between calls
    q, k, v = (t.detach() for t in _qkv())
    seg = SEGMENTS.clone()
    kernels.attention(q, k, v, segment_ids=seg, backend="triton")
    seg[0, :20] = 7
    out = kernels.attention(q, k, v, segment_ids=seg, backend="triton")
    torch.testing.assert_close(out, attention_ref(q, k, v, segment_ids=seg), **ATTN_FWD)
