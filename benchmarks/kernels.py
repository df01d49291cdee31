"""Benchmark kiln's fused kernels against SDPA / flash-attn / eager PyTorch / torch.compile, and record the results.

    python benchmarks/kernels.py               # GPU when available, else the CPU comparisons
    python benchmarks/kernels.py --device cpu  # force the CPU comparisons
    python benchmarks/kernels.py --dry-run     # the GPU plan at tiny shapes on CPU (interpreter; no speed)
    python benchmarks/kernels.py --render results/kernels-cuda-X.json   # (re)write the .md of a .json

GPU (bf16 unless said, timed with torch.cuda.Event after warmup, median of the repeats):
  * correctness first: every Triton kernel forward and backward against a float64 reference at a moderate size,
    fp32 and bf16, as ||out - ref|| / ||ref|| per output and gradient (fresh random inputs);
  * attention fwd+bwd TFLOP/s at seq 2048..8192, head dim 64 and 128 (16k tokens per step, GQA 4:1, causal),
    one document per row and 4 packed documents per row, for: our Triton kernel; kiln's SDPA path (a dense
    boolean mask when packed); ``F.scaled_dot_product_attention`` pinned to the flash, memory-efficient and cuDNN
    backends, in its native [b, h, s, d] layout with the packed documents as batch rows (the same work a varlen
    kernel does, since the documents have equal lengths); flash-attn varlen when installed. TFLOP/s count only the
    useful (within-document, causal) work. Ratios: best SDPA backend time / Triton time per shape (> 1: ours wins);
  * RMSNorm(+residual), RoPE, SwiGLU, cross-entropy, fwd+bwd: fused Triton vs the unfused PyTorch ops (eager) and
    vs ``torch.compile`` of those same ops, with the peak memory of each; ratios eager / fused and compiled / fused.
CPU (fp32, time.perf_counter): our PyTorch/SDPA dispatch vs the references at small sizes, and, clearly labelled,
the Triton kernels under TRITON_INTERPRET=1 at tiny sizes (the interpreter emulates the GPU program in numpy: those
numbers say nothing about GPU speed, only that the path runs end to end).

Every row is measured on its own: a backend that fails (not available, out of memory, a kernel that does not
launch) becomes a row with the error in its note, and the rest still runs. The JSON is rewritten after every
group, so a run killed by a timeout keeps what it measured.

Writes <out-dir>/<stem>.json and .md (stem default kernels-<device>-<date>) with the command, machine and date.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running as a script puts benchmarks/ first on sys.path, where sibling scripts (benchmarks/tokenize.py) would
# shadow standard-library modules; import from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from importlib.util import find_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if find_spec("kiln") is None:  # not installed: the checkout (an install or a PYTHONPATH entry takes precedence)
    sys.path.append(str(REPO))


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats (default: 20 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=0, help="untimed calls first (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--stem", default=None, help="output file stem (default kernels-<device>-<date>)")
    p.add_argument("--no-md", action="store_true", help="write only the .json (render the .md later: --render)")
    p.add_argument("--quick", action="store_true", help="fewer sizes (smoke run)")
    p.add_argument(
        "--seqs", type=_csv_ints, default=None, help="GPU attention sequence lengths (default 2048,4096,8192)"
    )
    p.add_argument("--dims", type=_csv_ints, default=None, help="GPU attention head dims (default 64,128)")
    p.add_argument("--skip-check", action="store_true", help="GPU plan: no correctness check before timing")
    p.add_argument("--skip-compile", action="store_true", help="GPU plan: no torch.compile rows")
    p.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; --dry-run: aot_eager)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run the GPU plan (check, attention backends, fused vs eager vs torch.compile) at tiny shapes on CPU: "
        "Triton under TRITON_INTERPRET=1, CUDA-only SDPA backends recorded as unavailable; not a speed measure",
    )
    p.add_argument("--render", metavar="JSON", help="write the .md for a results .json and exit")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU runs: torch threads (default 1: stable numbers on a shared machine)"
    )
    return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None

import torch  # noqa: E402

want_cuda = False
if ARGS is not None:
    want_cuda = not ARGS.dry_run and (ARGS.device == "cuda" or (ARGS.device == "auto" and torch.cuda.is_available()))
    if not want_cuda:
        # Triton rows on CPU need the interpreter; set before kernels imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")


import torch.nn.functional as F  # noqa: E402

from kiln import kernels  # noqa: E402
from kiln.kernels._attention import flash_attn_available  # noqa: E402
from kiln.kernels.reference import (  # noqa: E402
    apply_rope_ref,
    attention_ref,
    cross_entropy_ref,
    rms_norm_ref,
    swiglu_ref,
)

# ---------------------------------------------------------------------------------------------------------------
# timing


def time_fn(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(f, inputs):
    """A closure running f(*inputs) forward and backward (inputs require grad). The upstream gradients are drawn
    once, on the first call, so the timed calls do no random-number generation."""
    grads: list = []

    def run():
        for t in inputs:
            t.grad = None
        out = f(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if not grads:
            grads.extend(torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grads)

    return run


def peak_mem_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _error_note(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}"


def measure(rows, group, name, shape, fn, device, repeats, warmup, flops=None, note=""):
    """Time ``fn`` into a row (with its peak memory on GPU); a failure becomes a row with the error as its note."""
    row = dict(group=group, name=name, shape=shape, ms=None, tflops=None, note=note)
    try:
        ms = time_fn(fn, device, repeats, warmup)
        row["ms"] = round(ms, 4)
        if flops:
            row["tflops"] = round(flops / ms / 1e9, 3)
        mem = peak_mem_mb(fn, device)
        if mem is not None:
            row["peak_mb"] = round(mem, 1)
    except Exception as e:  # noqa: BLE001 - one backend failing must not lose the other rows
        row["note"] = (note + "; " if note else "") + _error_note(e)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    rows.append(row)
    _print_row(row)
    return row


# ---------------------------------------------------------------------------------------------------------------
# correctness on the device (float64 references)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    den = ref.norm().item()
    num = (got.double() - ref).norm().item()
    return num / den if den > 0 else num


# ||out - ref|| / ||ref|| limits: fp32 (ieee dots, fp32 accumulation) lands far below; bf16 operands near 1e-3..1e-2
REL_LIMIT = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _check(rows, name, dtype, shape, pairs):
    """pairs: [(label, got, ref)] -> one row with the worst relative error and each one in the note."""
    errs = {label: rel_err(got, ref) for label, got, ref in pairs}
    worst = max(errs.values())
    ok = all(e == e for e in errs.values()) and worst <= REL_LIMIT[dtype]  # e == e: not NaN
    row = dict(
        group="correctness vs float64 reference (||x - ref|| / ||ref||)",
        name=f"{name} {str(dtype).replace('torch.', '')}",
        shape=shape,
        ms=None,
        tflops=None,
        rel_err=worst,
        ok=ok,
        note=", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f" (limit {REL_LIMIT[dtype]:.0e})",
    )
    rows.append(row)
    _print_row(row)


def _ref_grads(outs, inputs, gouts):
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, inputs, gouts)


def check_kernels(device, rows, plan):
    """Every Triton kernel, fp32 and bf16, forward and backward, against float64 on the same device."""
    for dtype in (torch.float32, torch.bfloat16):
        for d, s, docs in plan["check_attention"]:
            try:
                _check_attention(device, dtype, rows, plan["hidden_attn"], d, s, docs)
            except Exception as e:  # noqa: BLE001
                _check_failed(rows, f"attention triton d{d} {docs} docs", dtype, e)
        for name, fn in (("rms_norm+residual", _check_rms), ("rope", _check_rope), ("swiglu", _check_swiglu),
                         ("cross_entropy", _check_ce)):  # fmt: skip
            try:
                fn(device, dtype, rows, plan["check_fused"])
            except Exception as e:  # noqa: BLE001
                _check_failed(rows, name, dtype, e)


def _check_failed(rows, name, dtype, e):
    row = dict(group="correctness vs float64 reference (||x - ref|| / ||ref||)",
               name=f"{name} {str(dtype).replace('torch.', '')}", shape="", ms=None, tflops=None,
               rel_err=None, ok=False, note=_error_note(e))  # fmt: skip
    rows.append(row)
    _print_row(row)


def _pair_inputs(device, dtype, *shapes, scale=1.0):
    """Random inputs in ``dtype`` (leaves) and their exact float64 copies (leaves): the reference sees the very
    values the kernel sees, so the error measured is the kernel's, not the input rounding."""
    lo, hi = [], []
    for shape in shapes:
        t = (torch.randn(*shape, device=device, dtype=torch.float64) * scale).to(dtype)
        lo.append(t.clone().requires_grad_())
        hi.append(t.double().requires_grad_())
    return lo, hi


def _check_attention(device, dtype, rows, hidden, d, s, docs):
    h = hidden // d
    hkv = max(1, h // 4)
    b = 2
    (q, k, v), (qd, kd, vd) = _pair_inputs(device, dtype, (b, s, h, d), (b, s, hkv, d), (b, s, hkv, d))
    seg = None
    if docs > 1:
        lens = torch.tensor([s // docs] * (docs - 1) + [s - (s // docs) * (docs - 1)], device=device)
        seg = torch.repeat_interleave(torch.arange(docs, device=device), lens)[None].expand(b, s).contiguous()
    out = kernels.attention(q, k, v, causal=True, segment_ids=seg, backend="triton")
    ref = attention_ref(qd, kd, vd, causal=True, segment_ids=seg)
    do = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    want = torch.autograd.grad(ref, (qd, kd, vd), do)
    pairs = [("out", out, ref)] + [(f"d{n}", g, w) for n, g, w in zip("qkv", got, want)]
    _check(rows, f"attention triton d{d} {docs} docs", dtype, _shape(b, s, h, hkv, d, docs), pairs)


def _check_rms(device, dtype, rows, cfg):
    tokens, hidden = cfg["tokens"], cfg["hidden"]
    (x, r), (xd, rd) = _pair_inputs(device, dtype, (tokens, hidden), (tokens, hidden))
    w0 = (torch.rand(hidden, device=device, dtype=torch.float64) + 0.5).to(dtype)
    w, wd = w0.clone().requires_grad_(), w0.double().requires_grad_()
    y, hsum = kernels.rms_norm(x, w, 1e-6, residual=r, backend="triton")
    y_ref, h_ref = rms_norm_ref(xd, wd, 1e-6, rd)
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    got = torch.autograd.grad((y, hsum), (x, r, w), (gy.to(dtype), gh.to(dtype)))
    want = torch.autograd.grad((y_ref, h_ref), (xd, rd, wd), (gy, gh))
    pairs = [("y", y, y_ref), ("h", hsum, h_ref)] + [(f"d{n}", g, t) for n, g, t in zip(("x", "res", "w"), got, want)]
    _check(rows, "rms_norm+residual triton", dtype, f"{tokens}x{hidden}", pairs)


def _cos_sin(tokens, d, device, dtype):
    pos = torch.arange(tokens, device=device).double()[:, None] / 10000 ** (
        torch.arange(0, d, 2, device=device).double() / d
    )
    emb = torch.cat([pos, pos], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _check_rope(device, dtype, rows, cfg):
    tokens, heads, d = cfg["tokens"], cfg["heads"], cfg["head_dim"]
    (q, k), (qd, kd) = _pair_inputs(device, dtype, (1, tokens, heads, d), (1, tokens, max(1, heads // 4), d))
    cos, sin = _cos_sin(tokens, d, device, dtype)
    rq, rk = kernels.apply_rope(q, k, cos, sin, backend="triton")
    fq, fk = apply_rope_ref(qd, kd, cos.double(), sin.double())
    gq, gk = torch.randn_like(fq), torch.randn_like(fk)
    got = torch.autograd.grad((rq, rk), (q, k), (gq.to(dtype), gk.to(dtype)))
    want = torch.autograd.grad((fq, fk), (qd, kd), (gq, gk))
    pairs = [("q", rq, fq), ("k", rk, fk), ("dq", got[0], want[0]), ("dk", got[1], want[1])]
    _check(rows, "rope triton", dtype, f"1x{tokens}x{heads}x{d}", pairs)


def _check_swiglu(device, dtype, rows, cfg):
    tokens, inter = cfg["tokens"], cfg["inter"]
    (g, u), (gd, ud) = _pair_inputs(device, dtype, (tokens, inter), (tokens, inter))
    out = kernels.swiglu(g, u, backend="triton")
    ref = swiglu_ref(gd, ud)
    do = torch.randn_like(ref)
    got = torch.autograd.grad(out, (g, u), do.to(dtype))
    want = torch.autograd.grad(ref, (gd, ud), do)
    _check(rows, "swiglu triton", dtype, f"{tokens}x{inter}",
           [("out", out, ref), ("dgate", got[0], want[0]), ("dup", got[1], want[1])])  # fmt: skip


def _check_ce(device, dtype, rows, cfg):
    n, vocab = cfg["ce_rows"], cfg["vocab"]
    (x,), (xd,) = _pair_inputs(device, dtype, (n, vocab), scale=2.0)
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::5] = -100
    loss = kernels.cross_entropy(x, labels, backend="triton")
    ref = F.cross_entropy(xd, labels, ignore_index=-100)
    (got,) = torch.autograd.grad(loss, (x,))
    (want,) = torch.autograd.grad(ref, (xd,))
    _check(rows, "cross_entropy triton", dtype, f"{n}x{vocab}", [("loss", loss, ref), ("dlogits", got, want)])


# ---------------------------------------------------------------------------------------------------------------
# attention


def attn_flops(doc_lens: list[int], batch: int, heads: int, d: int, causal: bool) -> float:
    """fwd+bwd FLOPs: fwd = 4 * s^2 * h * d per document (halved when causal), bwd = 2.5 x fwd."""
    fwd = sum(4 * s * s * heads * d for s in doc_lens) * batch
    if causal:
        fwd /= 2
    return 3.5 * fwd


def _sdpa_backends(device) -> list[tuple[str, object]]:
    from torch.nn.attention import SDPBackend

    names = [("sdpa flash", "FLASH_ATTENTION"), ("sdpa efficient", "EFFICIENT_ATTENTION"),
             ("sdpa cudnn", "CUDNN_ATTENTION")]  # fmt: skip
    return [(label, getattr(SDPBackend, attr)) for label, attr in names if hasattr(SDPBackend, attr)]


def _sdpa_fn(backend, h, hkv):
    """F.sdpa pinned to ``backend`` on [b, h, s, d] leaves, GQA through enable_gqa (or, where the backend refuses
    it, k/v expanded to every head inside the timed function, so the backward's reduction is timed too)."""
    from torch.nn.attention import sdpa_kernel

    def gqa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h)

    def expanded(q, k, v):
        rep = h // hkv
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), is_causal=True
            )

    return gqa, expanded


def bench_attention(device, dtype, seqs, dims, repeats, warmup, tokens_per_step, hidden, rows, after_each=None):
    """Triton vs SDPA backends vs kiln's SDPA path (and flash-attn when installed), fwd+bwd, per shape. Returns the
    ratios (best SDPA time / Triton time per shape); ``after_each(ratios)`` is called after every shape."""
    group = f"attention fwd+bwd ({device.type}, {str(dtype).replace('torch.', '')})"
    kiln_backends = ["triton", "sdpa"] + (["flash"] if device.type == "cuda" and flash_attn_available() else [])
    ratios = []
    for d in dims:
        h = hidden // d
        hkv = max(1, h // 4)
        for s in seqs:
            b = max(1, tokens_per_step // s)
            for docs in (1, 4):
                if docs > 1 and s < 4 * 16:
                    continue
                doc_len = s // docs
                lens = [doc_len] * (docs - 1) + [s - doc_len * (docs - 1)]
                shape = _shape(b, s, h, hkv, d, docs)
                flops = attn_flops(lens, b, h, d, True)
                q = torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True)
                k = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
                v = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
                seg = None
                if docs > 1:
                    seg = torch.repeat_interleave(torch.arange(docs, device=device), torch.tensor(lens, device=device))
                    seg = seg[None].expand(b, s).contiguous()
                times = {}
                for backend in kiln_backends:
                    name = {"triton": "kiln triton", "sdpa": "kiln sdpa path" + (" (dense mask)" if docs > 1 else ""),
                            "flash": "kiln flash-attn varlen"}[backend]  # fmt: skip
                    fn = fwd_bwd(
                        lambda q, k, v, backend=backend, seg=seg: kernels.attention(
                            q, k, v, causal=True, segment_ids=seg, backend=backend
                        ),
                        (q, k, v),
                    )
                    times[name] = measure(rows, group, name, shape, fn, device, repeats, warmup, flops)["ms"]
                del q, k, v
                # SDPA in its own layout; equal-length packed documents are batch rows (the varlen work exactly)
                if all(n == doc_len for n in lens):
                    bq = b * docs
                    qt = torch.randn(bq, h, doc_len, d, device=device, dtype=dtype, requires_grad=True)
                    kt = torch.randn(bq, hkv, doc_len, d, device=device, dtype=dtype, requires_grad=True)
                    vt = torch.randn(bq, hkv, doc_len, d, device=device, dtype=dtype, requires_grad=True)
                    note = "[b,h,s,d] leaves" + (", documents as batch rows" if docs > 1 else "")
                    for label, backend in _sdpa_backends(device):
                        gqa, expanded = _sdpa_fn(backend, h, hkv)
                        fn, name = fwd_bwd(gqa, (qt, kt, vt)), label
                        try:
                            fn()
                        except Exception:  # noqa: BLE001 - e.g. a backend without enable_gqa: expand k/v instead
                            fn, name = fwd_bwd(expanded, (qt, kt, vt)), f"{label} (kv expanded)"
                        times[label] = measure(rows, group, name, shape, fn, device, repeats, warmup, flops, note)["ms"]
                    del qt, kt, vt
                sdpa = {n: t for n, t in times.items() if n.startswith("sdpa") and t}
                tri = times.get("kiln triton")
                if tri and sdpa:
                    best = min(sdpa, key=sdpa.get)
                    ratios.append(dict(shape=shape, triton_ms=tri, best_sdpa=best, best_sdpa_ms=sdpa[best],
                                       ratio=_ratio(sdpa[best], tri), goal=1.0))  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if after_each is not None:
                    after_each(ratios)
    return ratios


def _shape(b, s, h, hkv, d, docs):
    return f"b{b} s{s} h{h}/kv{hkv} d{d}" + (f" {docs} docs" if docs > 1 else "")


# ---------------------------------------------------------------------------------------------------------------
# fused kernels vs unfused PyTorch (eager) and vs torch.compile of the same unfused ops


def fused_cases(device, dtype, cfg, fused_backend):
    """[(kernel, shape, inputs, kiln fn, unfused fn, note, extra rows [(name, fn)])] at the configured sizes;
    inputs are leaves."""
    tokens, hidden, inter, heads, d, vocab, ce_rows = cfg

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    cases = []
    x, res, w = leaf(tokens, hidden), leaf(tokens, hidden), leaf(hidden)
    cases.append(("rms_norm+residual", f"{tokens}x{hidden}", (x, res, w),
                  lambda x, r, w: kernels.rms_norm(x, w, 1e-6, residual=r, backend=fused_backend),
                  lambda x, r, w: rms_norm_ref(x, w, 1e-6, r), "", []))  # fmt: skip
    q, k = leaf(1, tokens, heads, d), leaf(1, tokens, max(1, heads // 4), d)
    pos = torch.arange(tokens, device=device).float()[:, None] / 10000 ** (torch.arange(0, d, 2, device=device) / d)
    emb = torch.cat([pos, pos], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    cases.append(("rope", f"1x{tokens}x{heads}x{d}", (q, k),
                  lambda q, k: kernels.apply_rope(q, k, cos, sin, backend=fused_backend),
                  lambda q, k: apply_rope_ref(q, k, cos, sin), "", []))  # fmt: skip
    g, u = leaf(tokens, inter), leaf(tokens, inter)
    cases.append(("swiglu", f"{tokens}x{inter}", (g, u),
                  lambda g, u: kernels.swiglu(g, u, backend=fused_backend), swiglu_ref, "", []))  # fmt: skip
    logits = leaf(ce_rows, vocab, scale=2.0)
    labels = torch.randint(0, vocab, (ce_rows,), device=device)
    labels[::5] = -100
    fp32_mb = ce_rows * vocab * 4 / 2**20
    extra = []
    if fused_backend != "torch":
        extra.append(
            ("cross_entropy kiln[torch, chunked]", lambda x: kernels.cross_entropy(x, labels, backend="torch"))
        )
    cases.append(("cross_entropy", f"{ce_rows}x{vocab}", (logits,),
                  lambda x: kernels.cross_entropy(x, labels, backend=fused_backend),
                  lambda x: cross_entropy_ref(x, labels),
                  f"unfused builds {fp32_mb:.3g} MB fp32 logits + a saved log-softmax of the same size", extra))  # fmt: skip
    return cases


def bench_fused(
    device,
    dtype,
    cfg,
    repeats,
    warmup,
    rows,
    triton_label,
    fused_backend,
    compile_backend=None,
    eager=True,
    after_each=None,
):
    """Each fused kernel vs its unfused PyTorch ops: ``eager``, and (``compile_backend``) torch.compile of the same
    ops. Returns per kernel the times and ratios (unfused time / fused time). ``after_each(ratios)``: called after
    each compiled kernel (they are slow to compile: the results so far get written)."""
    same = "kiln's torch path runs these very ops (dispatch overhead only)" if fused_backend == "torch" else ""
    cases = fused_cases(device, dtype, cfg, fused_backend)
    ratios: dict[str, dict] = {}
    if eager:
        group = f"fused vs unfused (fwd+bwd) {triton_label}"
        for kernel, shape, inputs, fused, unfused, note, extra in cases:
            kt = measure(rows, group, f"{kernel} kiln[{fused_backend}]", shape, fwd_bwd(fused, inputs), device,
                         repeats, warmup, note=same)["ms"]  # fmt: skip
            for name, fn in extra:
                measure(rows, group, name, shape, fwd_bwd(fn, inputs), device, repeats, warmup)
            et = measure(rows, group, f"{kernel} unfused torch (eager)", shape, fwd_bwd(unfused, inputs), device,
                         repeats, warmup, note=note)["ms"]  # fmt: skip
            ratios[kernel] = dict(shape=shape, kiln_ms=kt, eager_ms=et, vs_eager=_ratio(et, kt), goal_vs_eager=1.5)
    if compile_backend:
        group = f"torch.compile(unfused ops, backend={compile_backend}) (fwd+bwd) {triton_label}"
        for kernel, shape, inputs, _, unfused, _, _ in cases:
            ct = None
            try:
                compiled = torch.compile(unfused, backend=compile_backend, dynamic=False)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(group=group, name=f"{kernel} torch.compile", shape=shape, ms=None, tflops=None,
                                 note=_error_note(e)))  # fmt: skip
            else:
                ct = measure(rows, group, f"{kernel} torch.compile", shape, fwd_bwd(compiled, inputs), device,
                             repeats, warmup, note="the first warmup call compiles")["ms"]  # fmt: skip
            ratios.setdefault(kernel, dict(shape=shape))["compile_ms"] = ct
            ratios[kernel]["compile_backend"] = compile_backend
            if after_each is not None:
                after_each(ratios)
    return ratios


def _ratio(num, den):
    return float(f"{num / den:.4g}") if num and den else None


def bench_attention_cpu_dispatch(repeats, warmup, rows, quick):
    """CPU: the SDPA dispatch (what auto picks on CPU) vs the explicit reference, fp32."""
    group = "attention fwd+bwd, CPU: kiln sdpa dispatch vs explicit reference"
    for s in (256, 512) if quick else (256, 512, 1024):
        b, h, hkv, d = 1, 8, 2, 64
        q = torch.randn(b, s, h, d, requires_grad=True)
        k = torch.randn(b, s, hkv, d, requires_grad=True)
        v = torch.randn(b, s, hkv, d, requires_grad=True)
        seg = torch.repeat_interleave(torch.arange(4), s // 4)[None]
        for docs, segment_ids in ((1, None), (4, seg)):
            flops = attn_flops([s // docs] * docs, b, h, d, True)
            for name, f in (
                ("kiln sdpa", lambda q, k, v, sid=segment_ids: kernels.attention(q, k, v, segment_ids=sid, backend="sdpa")),
                ("reference (explicit softmax)", lambda q, k, v, sid=segment_ids: attention_ref(q, k, v, segment_ids=sid)),
            ):  # fmt: skip
                ms = time_fn(fwd_bwd(f, (q, k, v)), torch.device("cpu"), repeats, warmup)
                rows.append(dict(group=group, name=name, shape=_shape(b, s, h, hkv, d, docs), ms=round(ms, 3),
                                 tflops=round(flops / ms / 1e9, 4)))  # fmt: skip
                _print_row(rows[-1])


def bench_triton_interpret_tiny(rows):
    """CPU: every Triton kernel under TRITON_INTERPRET=1 at tiny sizes, next to the torch path. Not a speed test."""
    group = "TRITON_INTERPRET=1 (CPU emulation; NOT a speed measure), tiny sizes, fwd+bwd"
    dev = torch.device("cpu")
    q, k, v = (torch.randn(1, 64, hh, 32, requires_grad=True) for hh in (4, 2, 2))
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor([20, 30, 14]))[None]
    for backend in ("triton", "sdpa"):
        f = fwd_bwd(lambda q, k, v, be=backend: kernels.attention(q, k, v, segment_ids=seg, backend=be), (q, k, v))
        rows.append(dict(group=group, name=f"attention {backend}", shape=_shape(1, 64, 4, 2, 32, 3),
                         ms=round(time_fn(f, dev, 3, 1), 3)))  # fmt: skip
        _print_row(rows[-1])
    bench_fused(
        dev,
        torch.float32,
        (64, 256, 512, 4, 32, 2048, 16),
        3,
        1,
        rows,
        "TRITON_INTERPRET=1, NOT a speed measure",
        "triton",
    )


# ---------------------------------------------------------------------------------------------------------------
# the GPU plan (also run at tiny shapes on CPU by --dry-run)

GPU_PLAN = {
    "seqs": [2048, 4096, 8192],
    "dims": [64, 128],
    "tokens_per_step": 16384,
    "hidden_attn": 2048,
    # tokens, hidden, intermediate, heads, head_dim, vocab, cross-entropy rows (an 8B-sized layer, 128k vocab)
    "fused": (16384, 4096, 11008, 32, 128, 128256, 8192),
    "check_attention": [(64, 1024, 1), (64, 1024, 4), (128, 1024, 4)],
    "check_fused": {
        "tokens": 4096,
        "hidden": 4096,
        "heads": 32,
        "head_dim": 128,
        "inter": 11008,
        "ce_rows": 2048,
        "vocab": 32768,
    },  # fmt: skip
}
DRY_PLAN = {
    "seqs": [64],
    "dims": [16],
    "tokens_per_step": 128,
    "hidden_attn": 64,
    "fused": (64, 64, 128, 4, 16, 1500, 16),
    "check_attention": [(16, 64, 1), (16, 64, 4)],
    "check_fused": {"tokens": 32, "hidden": 48, "heads": 4, "head_dim": 16, "inter": 64, "ce_rows": 8, "vocab": 300},
}


def gpu_plan(device, args, rows, payload, write):
    """Correctness, attention and fused kernels on ``device`` (CUDA; CPU with the interpreter for --dry-run)."""
    plan = DRY_PLAN if device.type == "cpu" else GPU_PLAN
    if device.type == "cuda":
        repeats, warmup = args.repeats or 20, args.warmup or 5
        dtype = torch.bfloat16
    else:
        repeats, warmup = args.repeats or 1, args.warmup or 1
        dtype = torch.float32  # the interpreter cannot multiply bf16 in tl.dot; the check still runs bf16
    seqs = args.seqs or ([plan["seqs"][0], plan["seqs"][-1]] if args.quick else plan["seqs"])
    dims = args.dims or plan["dims"]
    ratios = payload.setdefault("ratios", {})
    if not args.skip_check:
        check_kernels(device, rows, plan)
        checks = [r for r in rows if "ok" in r]
        payload["checks_ok"] = all(r["ok"] for r in checks) if checks else None
        write()

    def attention_so_far(r):
        ratios["attention"] = r
        write()

    bench_attention(
        device, dtype, seqs, dims, repeats, warmup, plan["tokens_per_step"], plan["hidden_attn"], rows, attention_so_far
    )
    label = f"({device.type}, {str(dtype).replace('torch.', '')})"
    backend = None if args.skip_compile else (args.compile_backend or ("aot_eager" if args.dry_run else "inductor"))
    # eager comparisons of all four kernels first, then the (slow to compile) torch.compile rows
    fused = bench_fused(device, dtype, plan["fused"], repeats, warmup, rows, label, "triton")
    ratios["fused"] = fused
    write()
    if backend:

        def merge(compiled):
            for kernel, r in compiled.items():
                f = fused.setdefault(kernel, dict(shape=r["shape"]))
                f.update(r, vs_compile=_ratio(r["compile_ms"], f.get("kiln_ms")))
            write()

        bench_fused(device, dtype, plan["fused"], repeats, warmup, rows, label, "triton", backend, False, merge)


# ---------------------------------------------------------------------------------------------------------------
# output


def _print_row(r):
    ms = "-" if r.get("ms") is None else f"{r['ms']:.3f}"
    tf = "" if r.get("tflops") is None else f"{r['tflops']:.3f}"
    mem = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
    note = f" {r['note']}" if r.get("note") and (r.get("ms") is None or "ok" in r) else ""
    print(
        f"{r['group'][:44]:<44} | {r['name']:<52} | {r['shape']:<26} | {ms:>10} | {tf:>9} | {mem:>8}{note}",
        flush=True,
    )


def machine_info(device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    return info


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - absent or broken optional package
        return None


def render_md(payload: dict) -> str:
    info = payload["machine"]
    lines = [
        f"# kernels benchmark ({info['device']}{', dry run: tiny shapes, not a speed measure' if payload.get('dry_run') else ''})",
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}",
        f"- machine: {info['platform']}, {info['cpu_count']} CPUs, GPU: {info['gpu'] or 'none'}"
        + (f", torch threads: {info['torch_threads']}" if info.get("torch_threads") else ""),
        f"- torch {info['torch']} (CUDA {info.get('cuda')}), triton {info['triton']}, "
        f"flash-attn {info['flash_attn'] or 'not installed'}",
        "",
        "TFLOP/s for attention count fwd+bwd = 3.5 x forward FLOPs, causal (halved), only within-document work.",
        "",
    ]
    ratios = payload.get("ratios") or {}
    if ratios.get("attention"):
        lines += ["## ratios: attention (best SDPA backend ms / kiln triton ms; goal >= 1.0)", "",
                  "| shape | triton ms | best SDPA | its ms | ratio |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['shape']} | {r['triton_ms']} | {r['best_sdpa']} | {r['best_sdpa_ms']} | {r['ratio']} |"
                  for r in ratios["attention"]]  # fmt: skip
        lines.append("")
    if ratios.get("fused"):
        lines += ["## ratios: fused kernels (unfused ms / fused ms; goal vs eager >= 1.5)", "",
                  "| kernel | shape | fused ms | eager ms | vs eager | compiled ms | vs compile |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for k, r in ratios["fused"].items():
            lines.append(f"| {k} | {r['shape']} | {r['kiln_ms']} | {r['eager_ms']} | {r['vs_eager']} | "
                         f"{r.get('compile_ms')} | {r.get('vs_compile')} |")  # fmt: skip
        lines.append("")
    group = None
    for r in payload["rows"]:
        if r["group"] != group:
            group = r["group"]
            lines += [
                "",
                f"## {group}",
                "",
                "| kernel | shape | ms | TFLOP/s | peak MB | note |",
                "|---|---|---|---|---|---|",
            ]
        ms = "-" if r.get("ms") is None else r["ms"]
        ok = "" if "ok" not in r else ("ok: " if r["ok"] else "**FAIL**: ")
        lines.append(
            f"| {r['name']} | {r['shape']} | {ms} | {r.get('tflops') or ''} | {r.get('peak_mb') or ''} | "
            f"{ok}{r.get('note') or ''} |"
        )
    return "\n".join(lines) + "\n"


def write_results(rows, info, out_dir: Path, command: str, stem: str | None = None, md: bool = True, extra=None):
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    stem = stem or f"kernels-{info['device']}-{now:%Y%m%d-%H%M%S}"
    payload = {"command": command, "date": now.isoformat(timespec="seconds"), "machine": info, **(extra or {}),
               "rows": rows}  # fmt: skip
    js = out_dir / f"{stem}.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(js)  # a run killed while writing keeps the previous complete file
    if md:
        (out_dir / f"{stem}.md").write_text(render_md(payload))
    return js, out_dir / f"{stem}.md"


def main():
    args = ARGS
    if args.render:
        src = Path(args.render)
        dst = src.with_suffix(".md")
        dst.write_text(render_md(json.loads(src.read_text())))
        print(f"wrote {dst}")
        return
    device = torch.device("cuda" if want_cuda else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    info = machine_info(device)
    print(f"{'group':<44} | {'kernel':<52} | {'shape':<26} | {'ms':>10} | {'TFLOP/s':>9} | {'peak MB':>8}")
    rows: list[dict] = []
    now = dt.datetime.now(dt.timezone.utc)
    stem = args.stem or f"kernels-{'dryrun' if args.dry_run else device.type}-{now:%Y%m%d-%H%M%S}"
    payload: dict = {"dry_run": args.dry_run}

    def write():
        return write_results(rows, info, Path(args.out_dir), command, stem, not args.no_md, payload)

    if device.type == "cuda" or args.dry_run:
        print(json.dumps(info), flush=True)
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        gpu_plan(device, args, rows, payload, write)
    else:
        repeats = args.repeats or 5
        torch.set_num_threads(args.threads)
        info["torch_threads"] = torch.get_num_threads()
        bench_attention_cpu_dispatch(repeats, 1, rows, args.quick)
        bench_fused(device, torch.float32, (2048, 1024, 2816, 16, 64, 32000, 1024), repeats, 1, rows,
                    "(CPU fp32, torch paths)", "torch")  # fmt: skip
        bench_triton_interpret_tiny(rows)
    print(json.dumps(info))
    js, md = write()
    print(f"wrote {js}" + ("" if args.no_md else f" and {md}"))
    failed = [r["name"] for r in rows if r.get("ok") is False]
    if failed:
        print(f"correctness check FAILED for: {', '.join(failed)}", flush=True)


if __name__ == "__main__":
    main()
