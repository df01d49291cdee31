"""Benchmark kiln's fused kernels against flash-attn / SDPA / unfused PyTorch, and record the results.

    python benchmarks/kernels.py               # GPU when available, else the CPU comparisons
    python benchmarks/kernels.py --device cpu  # force the CPU comparisons

GPU (bf16, timed with torch.cuda.Event after warmup, median of the repeats):
  * attention fwd+bwd TFLOP/s at seq 1k..16k, head dim 64 and 128 (16k tokens per step, GQA 4:1, causal), for our
    Triton kernel, flash-attn varlen (when installed) and SDPA; plus a packed-documents row (4 docs per sequence),
    whose TFLOP/s count only the useful (within-document, causal) work.
  * RMSNorm(+residual), RoPE, SwiGLU, cross-entropy: fused Triton vs the unfused PyTorch ops (fwd+bwd), with the
    peak memory of the cross-entropy.
CPU (fp32, time.perf_counter): our PyTorch/SDPA dispatch vs the references at small sizes, and, clearly labelled,
the Triton kernels under TRITON_INTERPRET=1 at tiny sizes (the interpreter emulates the GPU program in numpy: those
numbers say nothing about GPU speed, only that the path runs end to end).

Writes benchmarks/results/kernels-<device>-<date>.json and .md with the command, machine and date.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats (default: 20 on GPU, 5 on CPU)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="fewer sizes (smoke run)")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU runs: torch threads (default 1: stable numbers on a shared machine)"
    )
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None

import torch  # noqa: E402

if ARGS is not None:
    want_cuda = ARGS.device == "cuda" or (ARGS.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        # Triton rows on CPU need the interpreter; set before kernels imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")


from kiln.kernels._attention import flash_attn_available  # noqa: E402
from kiln.kernels.reference import (  # noqa: E402
    apply_rope_ref,
    attention_ref,
    cross_entropy_ref,
    rms_norm_ref,
    swiglu_ref,
)

from kiln import kernels  # noqa: E402

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


# ---------------------------------------------------------------------------------------------------------------
# attention


def attn_flops(doc_lens: list[int], batch: int, heads: int, d: int, causal: bool) -> float:
    """fwd+bwd FLOPs: fwd = 4 * s^2 * h * d per document (halved when causal), bwd = 2.5 x fwd."""
    fwd = sum(4 * s * s * heads * d for s in doc_lens) * batch
    if causal:
        fwd /= 2
    return 3.5 * fwd


def bench_attention(device, dtype, seqs, dims, repeats, warmup, tokens_per_step, hidden, rows):
    backends = ["triton", "sdpa"] + (["flash"] if device.type == "cuda" and flash_attn_available() else [])
    for d in dims:
        h = hidden // d
        hkv = max(1, h // 4)
        for s in seqs:
            b = max(1, tokens_per_step // s)
            for docs in (1, 4):
                if docs > 1 and s < 4 * 16:
                    continue
                q = torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True)
                k = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
                v = torch.randn(b, s, hkv, d, device=device, dtype=dtype, requires_grad=True)
                doc_len = s // docs
                lens = [doc_len] * (docs - 1) + [s - doc_len * (docs - 1)]
                seg = None
                if docs > 1:
                    seg = torch.repeat_interleave(torch.arange(docs, device=device), torch.tensor(lens, device=device))
                    seg = seg[None].expand(b, s).contiguous()
                flops = attn_flops(lens, b, h, d, True)
                for backend in backends:
                    fn = fwd_bwd(
                        lambda q, k, v, backend=backend, seg=seg: kernels.attention(
                            q, k, v, causal=True, segment_ids=seg, backend=backend
                        ),
                        (q, k, v),
                    )
                    try:
                        ms = time_fn(fn, device, repeats, warmup)
                    except torch.OutOfMemoryError:
                        rows.append(dict(group="attention fwd+bwd", name=backend, shape=_shape(b, s, h, hkv, d, docs),
                                         ms=None, tflops=None, note="OOM"))  # fmt: skip
                        torch.cuda.empty_cache()
                        continue
                    rows.append(
                        dict(
                            group="attention fwd+bwd",
                            name=backend,
                            shape=_shape(b, s, h, hkv, d, docs),
                            ms=round(ms, 4),
                            tflops=round(flops / ms / 1e9, 2),
                        )
                    )
                    _print_row(rows[-1])
                del q, k, v


def _shape(b, s, h, hkv, d, docs):
    return f"b{b} s{s} h{h}/kv{hkv} d{d}" + (f" {docs} docs" if docs > 1 else "")


# ---------------------------------------------------------------------------------------------------------------
# fused kernels vs unfused PyTorch


def bench_fused(device, dtype, cfg, repeats, warmup, rows, triton_label, fused_backend):
    tokens, hidden, inter, heads, d, vocab, ce_rows = cfg
    group = f"fused vs unfused (fwd+bwd) {triton_label}"
    same = "kiln's torch path runs these very ops (dispatch overhead only)" if fused_backend == "torch" else ""

    def add(name, shape, fn, note=""):
        ms = time_fn(fn, device, repeats, warmup)
        row = dict(group=group, name=name, shape=shape, ms=round(ms, 4), tflops=None, note=note)
        mem = peak_mem_mb(fn, device)
        if mem is not None:
            row["peak_mb"] = round(mem, 1)
        rows.append(row)
        _print_row(row)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    x, res, w = leaf(tokens, hidden), leaf(tokens, hidden), leaf(hidden)
    shape = f"{tokens}x{hidden}"
    add(f"rms_norm+residual kiln[{fused_backend}]", shape,
        fwd_bwd(lambda x, r, w: kernels.rms_norm(x, w, 1e-6, residual=r, backend=fused_backend), (x, res, w)), same)  # fmt: skip
    add("rms_norm+residual unfused torch", shape, fwd_bwd(lambda x, r, w: rms_norm_ref(x, w, 1e-6, r), (x, res, w)))

    q, k = leaf(1, tokens, heads, d), leaf(1, tokens, max(1, heads // 4), d)
    pos = torch.arange(tokens, device=device).float()[:, None] / 10000 ** (torch.arange(0, d, 2, device=device) / d)
    emb = torch.cat([pos, pos], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    shape = f"1x{tokens}x{heads}x{d}"
    add(f"rope kiln[{fused_backend}]", shape,
        fwd_bwd(lambda q, k: kernels.apply_rope(q, k, cos, sin, backend=fused_backend), (q, k)), same)  # fmt: skip
    add("rope unfused torch", shape, fwd_bwd(lambda q, k: apply_rope_ref(q, k, cos, sin), (q, k)))

    g, u = leaf(tokens, inter), leaf(tokens, inter)
    shape = f"{tokens}x{inter}"
    add(
        f"swiglu kiln[{fused_backend}]",
        shape,
        fwd_bwd(lambda g, u: kernels.swiglu(g, u, backend=fused_backend), (g, u)),
        same,
    )
    add("swiglu unfused torch", shape, fwd_bwd(swiglu_ref, (g, u)))

    logits = leaf(ce_rows, vocab, scale=2.0)
    labels = torch.randint(0, vocab, (ce_rows,), device=device)
    labels[::5] = -100
    shape = f"{ce_rows}x{vocab}"
    add(f"cross_entropy kiln[{fused_backend}]", shape,
        fwd_bwd(lambda x: kernels.cross_entropy(x, labels, backend=fused_backend), (logits,)))  # fmt: skip
    if fused_backend != "torch":
        add("cross_entropy kiln[torch, chunked]", shape,
            fwd_bwd(lambda x: kernels.cross_entropy(x, labels, backend="torch"), (logits,)))  # fmt: skip
    fp32_mb = ce_rows * vocab * 4 / 2**20
    add("cross_entropy unfused (fp32 logits + F.cross_entropy)", shape,
        fwd_bwd(lambda x: cross_entropy_ref(x, labels), (logits,)),
        f"builds {fp32_mb:.3g} MB fp32 logits + a saved log-softmax of the same size")  # fmt: skip


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
# output


def _print_row(r):
    ms = "-" if r.get("ms") is None else f"{r['ms']:.3f}"
    tf = "" if r.get("tflops") is None else f"{r['tflops']:.3f}"
    mem = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
    print(f"{r['group'][:44]:<44} | {r['name']:<52} | {r['shape']:<26} | {ms:>10} | {tf:>9} | {mem:>8}", flush=True)


def machine_info(device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
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


def write_results(rows, info, out_dir: Path, command: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    stem = f"kernels-{info['device']}-{now:%Y%m%d-%H%M%S}"
    payload = {"command": command, "date": now.isoformat(timespec="seconds"), "machine": info, "rows": rows}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# kernels benchmark ({info['device']})",
        "",
        f"- command: `{command}`",
        f"- date: {payload['date']}",
        f"- machine: {info['platform']}, {info['cpu_count']} CPUs, GPU: {info['gpu'] or 'none'}"
        + (f", torch threads: {info['torch_threads']}" if info.get("torch_threads") else ""),
        f"- torch {info['torch']}, triton {info['triton']}, flash-attn {info['flash_attn'] or 'not installed'}",
        "",
        "TFLOP/s for attention count fwd+bwd = 3.5 x forward FLOPs, causal (halved), only within-document work.",
        "",
    ]
    group = None
    for r in rows:
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
        lines.append(
            f"| {r['name']} | {r['shape']} | {ms} | {r.get('tflops') or ''} | {r.get('peak_mb') or ''} | "
            f"{r.get('note') or ''} |"
        )
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


def main():
    args = ARGS
    device = torch.device("cuda" if want_cuda else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    info = machine_info(device)
    print(f"{'group':<44} | {'kernel':<52} | {'shape':<26} | {'ms':>10} | {'TFLOP/s':>9} | {'peak MB':>8}")
    rows: list[dict] = []
    if device.type == "cuda":
        print(json.dumps(info))
        repeats = args.repeats or 20
        seqs = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
        bench_attention(device, torch.bfloat16, seqs, [64, 128], repeats, 5, 16384, 2048, rows)
        bench_fused(device, torch.bfloat16, (16384, 4096, 11008, 32, 128, 128256, 8192), repeats, 5, rows,
                    "(GPU, bf16)", "triton")  # fmt: skip
    else:
        repeats = args.repeats or 5
        torch.set_num_threads(args.threads)
        info["torch_threads"] = torch.get_num_threads()
        bench_attention_cpu_dispatch(repeats, 1, rows, args.quick)
        bench_fused(device, torch.float32, (2048, 1024, 2816, 16, 64, 32000, 1024), repeats, 1, rows,
                    "(CPU fp32, torch paths)", "torch")  # fmt: skip
        bench_triton_interpret_tiny(rows)
    print(json.dumps(info))
    js, md = write_results(rows, info, Path(args.out_dir), command)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
