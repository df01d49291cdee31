"""Trainer throughput: our trainer at 1 rank vs a plain PyTorch loop, and (on a GPU) the MFU of a ~1B model.

Loop comparison (always; on CPU here, and on the GPU when one is present, both sides on it): the same
``KilnLlama`` (``kiln.pretrain.model``), the same data (``SyntheticTokens`` packed samples, cut into micro-batches by
the trainer's own ``local_micro_batches``), the same AdamW update rule (decay on matrices only, same
betas/eps/lr schedule), the same gradient clipping, the same global batch and gradient accumulation, fp32, one
process. Each side runs AdamW the way its user gets it by default: the plain loop ``torch.optim.AdamW(params)``
(one tensor at a time on CPU, ``foreach`` on CUDA), our trainer its recipe default ``optimizer.implementation:
fused`` (one fused kernel per parameter group, as torchtitan's default); ``--optimizer-implementation for-loop``
runs our trainer with the plain loop's kernel instead, for a like-for-like comparison of everything else. The
two kernels round differently, so the per-step losses then agree to float rounding (about 1e-7 relative) instead
of bitwise.

- kiln: ``kiln.pretrain.train.train`` with its default callbacks (NaN guard, throughput, console line; no metrics
  file / W&B), i.e. the DeepSpeed engine (ZeRO stage as in the recipe) on a 1-rank gloo group;
- plain: ``for step: for micro-batch: loss = model(...) / n_micro; loss.backward()``, then
  ``clip_grad_norm_``, ``torch.optim.AdamW.step()``, ``zero_grad(set_to_none=True)``.

The two sides run *paired*: a callback of our trainer runs one plain-loop step right after each trainer step,
and that time is taken out of the trainer's clock. So step k of each side is measured under the same machine
load (the 2-core machines this runs on are shared), and the ratio is robust to load changes. A kiln step time
is the wall time from the end of the previous step's hooks to the end of this step's hooks (it includes
everything the loop does: data, engine, callbacks); a plain step time covers data, forward/backward, clip and
optimizer step. tokens/s = global batch x seq / median step time over the timed steps (after ``--warmup``
steps of each of ``--rounds`` fresh runs); the headline ratio is the ratio of those medians, and the median of
the per-step paired ratios is reported next to it. The per-step losses of the two sides are compared too:
they agree (same model, data and update rule), so both loops really do the same work.

GPU (only when ``torch.cuda.is_available()``): our trainer on a ~1B Llama (hidden 2048, 16 layers, 32 heads,
8 KV heads, FFN 8192, vocab 128256, tied) at seq 4096, bf16, and the MFU from
``kiln.pretrain.callbacks.flops_per_token`` (causal attention FLOPs) and ``peak_flops_per_device("bfloat16")``.
Without a GPU this part is reported as not run.

GPU mode (``--gpu``, what ``benchmarks/gpu_suite.sh`` runs on one H200): the same pairing on the ~1B model of
``recipes/pretrain/llama_1b_1gpu.yaml`` (seq 4096, 4 packed documents per sample, bf16, ZeRO 1 at DP = 1, fused
kernels as the recipe says). The plain loop then does what DeepSpeed's bf16 mode does, by hand: bf16 weights
(copied from the engine's module, so both sides start from the same weights), fp32 master weights, gradients
accumulated in fp32 over the micro-batches, ``clip_grad_norm_`` and ``torch.optim.AdamW`` on the masters, then
the masters copied back into the bf16 weights. Reported per side: median step time, tokens/s, TFLOP/s and MFU
(``flops_per_token`` over ``peak_flops_per_device``; the kiln side's numbers are those of its own ``Throughput``
callback, i.e. of its console line), the peak GPU memory during its steps (both models resident), the per-step
losses; written as JSON with ``--json-out``. ``--gpu --dry-run`` runs that code path on CPU with a tiny model.

Usage (from the repository root):

    python -m benchmarks.train                       # CPU comparison (+ GPU MFU when a GPU is present)
    python -m benchmarks.train --gpu --json-out train.json   # 1B, bf16, kiln vs plain on one GPU
    python -m benchmarks.train --gpu --dry-run --no-record   # the same code path on CPU, tiny model
    python -m benchmarks.train --zero-stage 0        # the DeepSpeed engine without the ZeRO optimizer wrapper
    python -m benchmarks.train --profile             # also: cProfile of kiln steps, top functions by self time

Results are appended to benchmarks/results/train.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train.md"
TINY = str(REPO / "recipes" / "pretrain" / "tiny.yaml")
GPU_RECIPE = str(REPO / "recipes" / "pretrain" / "llama_1b_1gpu.yaml")
# --gpu --dry-run: the 1-GPU recipe shrunk to a CPU-sized model (same precision, packing, ZeRO stage, kernels)
DRY_OVERRIDES = [
    "model.vocab_size=256",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.head_dim=16",
    "model.max_position_embeddings=64",
    "synthetic_data.seq_length=64",
    "parallel.micro_batch=2",
    "parallel.global_batch=4",
]
RUN_DIR = Path(tempfile.gettempdir()) / "kiln-benchmark-train"  # nothing is logged there (loggers off)

CPU_MODEL = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 512,
}
GPU_MODEL = {  # ~1.24B parameters (Llama-3.2-1B geometry)
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "attention_backend": "auto",
    "fused_kernels": "true",
}


def make_recipe(
    model: dict, seq: int, micro: int, global_batch: int, steps: int, zero_stage: int, precision: str,
    extra: tuple[str, ...] = (),
):  # fmt: skip
    from kiln.pretrain.recipe import load_recipe

    overrides = [f"model.{k}={v}" for k, v in model.items()] + [
        *extra,
        f"synthetic_data.seq_length={seq}",
        "synthetic_data.documents_per_sample=4",
        f"parallel.micro_batch={micro}",
        f"parallel.global_batch={global_batch}",
        f"parallel.zero_stage={zero_stage}",
        f"precision={precision}",
        f"train_steps={steps}",
        "schedule.warmup_steps=2",
        "log_interval=1000000",
        "wandb_mode=disabled",
        f"run_dir={RUN_DIR}",
    ]
    return load_recipe(TINY, overrides)


def single_rank_env() -> None:
    """torchrun's variables for one process, so ``init_parallel`` starts a 1-rank group."""
    from kiln.pretrain.testing import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _sync() -> None:
    """Wait for queued GPU work, so that a step's time includes its kernels (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class StepClock:
    """Callback: wall time between consecutive step ends (the first step is timed from ``on_train_start``)."""

    def __init__(self):
        from kiln.pretrain.callbacks.base import Callback

        clock = self

        class _CB(Callback):
            def on_train_start(self, state):
                clock.last = time.perf_counter()

            def on_step_end(self, state, metrics):
                _sync()
                now = time.perf_counter()
                clock.times.append(now - clock.last)
                clock.losses.append(float(metrics["loss"]))
                clock.metrics.append(dict(metrics))
                clock.last = now

        self.times: list[float] = []
        self.losses: list[float] = []
        self.metrics: list[dict] = []
        self.last = 0.0
        self.callback = _CB()


def run_kiln(recipe, dataset, ctx, profile: cProfile.Profile | None = None) -> StepClock:
    from kiln.pretrain.engine import TrainEngine
    from kiln.pretrain.train import train

    engine = TrainEngine(recipe, ctx)
    clock = StepClock()
    if profile is not None:
        profile.enable()
    train(recipe, [clock.callback], dataset=dataset, ctx=ctx, loggers=False, engine=engine)
    if profile is not None:
        profile.disable()
    return clock


class PlainLoop:
    """The reference loop: same model, data, micro-batching, AdamW, clipping and LR schedule; nothing else.

    fp32: the model's own parameters in ``torch.optim.AdamW``. bf16 (the recipe's precision): bf16 weights, fp32
    master copies that AdamW updates, gradients accumulated in fp32, the masters copied back after each step (what
    DeepSpeed's bf16 mode does). ``source``: a module whose weights to start from (the engine's), else the seed."""

    def __init__(self, recipe, dataset, device, source=None):
        import torch

        from kiln.pretrain.engine.zero import weight_decay_groups
        from kiln.pretrain.model import KilnLlama
        from kiln.pretrain.schedule import LRSchedule

        self.recipe, self.dataset = recipe, dataset
        self.device = device
        self.bf16 = recipe.precision == "bf16"
        if source is None:
            self.model = KilnLlama(recipe.model, init_seed=recipe.seed).to(device)
        else:  # built on the device (no CPU init of a 1B model), weights copied from ``source`` below
            with torch.device(device):
                self.model = KilnLlama(recipe.model, init_seed=None)
        if self.bf16:
            self.model.to(torch.bfloat16)
        if source is not None:
            with torch.no_grad():
                pairs = [*zip(self.model.named_parameters(), source.named_parameters()),
                         *zip(self.model.named_buffers(), source.named_buffers())]  # fmt: skip
                for (name, p), (src_name, q) in pairs:
                    if name != src_name or p.shape != q.shape:
                        raise ValueError(f"cannot copy {src_name} {tuple(q.shape)} into {name} {tuple(p.shape)}")
                    p.copy_(q)
            # the RoPE frequencies are a plain attribute (never rounded to bf16): the source's, computed on CPU
            self.model.rotary.inv_freq = source.rotary.inv_freq.clone()
        opt = recipe.optimizer
        named = list(self.model.named_parameters())
        if self.bf16:
            self.masters = [p.detach().float().clone().requires_grad_() for _, p in named]
            named = [(n, m) for (n, _), m in zip(named, self.masters)]
        self.optimizer = torch.optim.AdamW(
            weight_decay_groups(named, opt.weight_decay),
            lr=opt.lr,
            betas=opt.betas,
            eps=opt.eps,
        )
        self.schedule = LRSchedule(recipe.schedule, opt.lr, recipe.train_steps)
        self.step_index, self.consumed = 0, 0
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self) -> None:
        import torch

        from kiln.pretrain.engine.batches import local_micro_batches

        start = _clock()
        micro, gb = self.recipe.parallel.micro_batch, self.recipe.parallel.global_batch
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.step_index)
        batches = local_micro_batches(self.dataset, self.consumed, gb, micro_batch=micro)
        params = list(self.model.parameters())
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in batches:
            mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            loss = self.model(
                mb["input_ids"],
                position_ids=mb["position_ids"],
                segment_ids=mb.get("segment_ids"),
                labels=mb["labels"],
                loss_mask=mb["loss_mask"],
            )
            (loss / len(batches)).backward()
            total += loss.detach().double()
            if self.bf16:  # accumulate in fp32 on the masters, as DeepSpeed's grad_accum_dtype fp32
                for p, m in zip(params, self.masters):
                    if p.grad is None:
                        continue
                    m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                    p.grad = None
        updated = self.masters if self.bf16 else params
        clip = self.recipe.optimizer.clip_grad
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(updated, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.bf16:
            with torch.no_grad():
                for p, m in zip(params, self.masters):
                    p.copy_(m)
        _sync()
        self.consumed += gb
        self.step_index += 1
        self.times.append(_since(start))
        self.losses.append(float(total) / len(batches))


def run_paired(
    recipe,
    dataset,
    ctx,
    profile: cProfile.Profile | None = None,
    skip_dp1_allreduce: bool = False,
    record: dict | None = None,
) -> tuple[list, list, list, list]:
    """Our trainer, with one plain-loop step run right after each of its steps (inside a callback whose time
    is taken out of the trainer's clock): each pair of step times is measured under the same machine load.
    Returns (kiln step times, plain step times, kiln losses, plain losses). ``record`` (a dict): the plain loop
    starts from the engine's weights, and the kiln side's per-step metrics (its Throughput callback's tokens/s,
    TFLOP/s, MFU) and each side's peak GPU memory during its steps are stored in it."""
    from kiln.pretrain.callbacks.base import Callback
    from kiln.pretrain.engine import TrainEngine
    from kiln.pretrain.train import train

    kiln_times: list[float] = []
    kiln_losses: list[float] = []
    gpu = ctx.device.type == "cuda"
    peaks = {"kiln": 0.0, "plain": 0.0}

    def peak(side):
        if gpu:
            import torch

            peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()

    class Paired(Callback):
        def on_train_start(self, state):
            self.last = _clock()

        def on_step_end(self, state, metrics):
            _sync()
            kiln_times.append(_since(self.last))
            kiln_losses.append(float(metrics["loss"]))
            if record is not None:
                keep = ("step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "loss", "grad_norm")
                record.setdefault("kiln_metrics", []).append({k: float(metrics[k]) for k in keep if k in metrics})
            peak("kiln")
            if profile is not None:
                profile.disable()
            plain.step()
            peak("plain")
            if profile is not None:
                profile.enable()
            self.last = _clock()

    if record is None:
        plain = PlainLoop(recipe, dataset, ctx.device)
    engine = TrainEngine(recipe, ctx)
    if record is not None:
        plain = PlainLoop(recipe, dataset, ctx.device, source=engine.module)
        if gpu:
            import torch

            record["static_memory_gib"] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    if skip_dp1_allreduce:
        # the fix proposed in benchmarks/results/train.md, tried from outside the engine: at DP = 1 there is
        # nothing to all-reduce (ZeRO 0 only: ZeRO 1/2 move the gradients into their partitions in that hook)
        if ctx.layout.dp != 1 or engine.zero_stage != 0:
            raise ValueError("--skip-dp1-allreduce needs DP = 1 and --zero-stage 0")
        engine.engine.enable_backward_allreduce = False  # the engine already does this at DP = 1 (fp32, PP = 1)
    if profile is not None:
        profile.enable()
    train(recipe, [Paired()], dataset=dataset, ctx=ctx, loggers=False, engine=engine)
    if profile is not None:
        profile.disable()
    if record is not None and gpu:
        record["peak_memory_gib"] = dict(peaks)
    return kiln_times, plain.times, kiln_losses, plain.losses


def cpu_comparison(args) -> dict:
    import torch

    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.engine.batches import SyntheticTokens

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.warmup + args.steps
    implementation = f"optimizer.implementation={args.optimizer_implementation}"
    recipe = make_recipe(
        CPU_MODEL, args.seq, args.micro_batch, args.global_batch, steps, args.zero_stage, "fp32", (implementation,)
    )
    s = recipe.synthetic_data
    dataset = SyntheticTokens(recipe.model.vocab_size, s.seq_length, s.seed, s.documents_per_sample)
    single_rank_env()
    ctx = init_parallel(recipe.layout(1), timeout_s=600)
    times: dict[str, list[tuple[float, float]]] = {"kiln": [], "plain": []}
    ratios: list[float] = []
    losses: dict[str, list[float]] = {}
    profile = cProfile.Profile() if args.profile else None
    try:
        for r in range(args.rounds):
            kt, pt, kl, pl = run_paired(recipe, dataset, ctx, profile, args.skip_dp1_allreduce)
            kt, pt = kt[args.warmup :], pt[args.warmup :]
            times["kiln"] += kt
            times["plain"] += pt
            ratios += [p[0] / k[0] for k, p in zip(kt, pt)]
            losses.setdefault("kiln", kl)
            losses.setdefault("plain", pl)
            kw, pw = statistics.median(t[0] for t in kt), statistics.median(t[0] for t in pt)
            print(f"round {r}: median wall step kiln {kw:.4f}s plain {pw:.4f}s", flush=True)
    finally:
        destroy_parallel()
    tokens = recipe.parallel.global_batch * recipe.seq_length
    out = {
        "recipe": recipe,
        "tokens_per_step": tokens,
        "threads": torch.get_num_threads(),
        "skip_dp1_allreduce": args.skip_dp1_allreduce,
        "device": "CPU" if ctx.device.type == "cpu" else f"GPU ({torch.cuda.get_device_name()}, fp32)",
        "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses["kiln"], losses["plain"])),
    }
    for side, t in times.items():
        wall, cpu = [w for w, _ in t], [c for _, c in t]
        med, cpu_med = statistics.median(wall), statistics.median(cpu)
        out[side] = {
            "median_s": med,
            "tokens_per_s": tokens / med,
            "n": len(t),
            "min_s": min(wall),
            "max_s": max(wall),
            "cpu_median_s": cpu_med,
            "tokens_per_cpu_s": tokens / cpu_med,
        }
    out["ratio"] = out["kiln"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    out["cpu_ratio"] = out["kiln"]["tokens_per_cpu_s"] / out["plain"]["tokens_per_cpu_s"]
    out["paired_ratio"] = statistics.median(ratios)
    if profile is not None:
        stats = pstats.Stats(profile)
        import io

        buf = io.StringIO()
        stats.stream = buf
        stats.sort_stats("cumulative").print_stats("deepspeed|pretrain|parallel", 40)
        stats.sort_stats("tottime").print_stats(25)
        out["profile"] = buf.getvalue()
    return out


def gpu_mfu(args) -> dict:
    """~1B model at seq 4096, bf16, 1 GPU: tokens/s and MFU of our trainer (median of the timed steps)."""
    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.callbacks.flops import flops_per_token, peak_flops_per_device
    from kiln.pretrain.engine.batches import SyntheticTokens

    steps = args.warmup + args.gpu_steps
    recipe = make_recipe(GPU_MODEL, 4096, args.gpu_micro_batch, args.gpu_global_batch, steps, 1, "bf16")
    if args.gpu_activation_checkpointing:
        recipe.parallel.activation_checkpointing = True
    s = recipe.synthetic_data
    dataset = SyntheticTokens(recipe.model.vocab_size, s.seq_length, s.seed, s.documents_per_sample)
    single_rank_env()
    ctx = init_parallel(recipe.layout(1), timeout_s=600)
    try:
        clock = run_kiln(recipe, dataset, ctx)
    finally:
        destroy_parallel()
    import torch

    med = statistics.median(clock.times[args.warmup :])
    tokens = recipe.parallel.global_batch * recipe.seq_length
    fpt = flops_per_token(recipe.model, recipe.seq_length, causal=True)
    peak = peak_flops_per_device("bfloat16")
    tps = tokens / med
    return {
        "device": torch.cuda.get_device_name(),
        "recipe": recipe,
        "median_s": med,
        "tokens_per_s": tps,
        "tflops": tps * fpt / 1e12,
        "mfu": tps * fpt / peak if peak else None,
        "peak": peak,
        "flops_per_token": fpt,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def gpu_comparison(args) -> dict:
    """--gpu: our trainer vs the plain loop, paired, on the ~1B recipe (tiny on CPU with --dry-run)."""
    import torch

    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.callbacks.flops import flops_per_token, peak_flops_per_device
    from kiln.pretrain.model import full_shapes
    from kiln.pretrain.recipe import load_recipe
    from kiln.pretrain.train import build_dataset

    if not args.dry_run and not _cuda():
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False); --dry-run runs it on CPU")
    warmup, steps = args.gpu_warmup, args.gpu_steps
    overrides = [
        *(DRY_OVERRIDES if args.dry_run else []),
        *args.override,
        f"train_steps={warmup + steps}",
        "log_interval=1",
        f"run_dir={RUN_DIR}",
        "wandb_mode=disabled",
        "checkpoint.interval=0",
        "eval.interval=0",
        "resume=false",
    ]
    recipe = load_recipe(args.gpu_recipe, overrides)
    dataset = build_dataset(recipe)
    single_rank_env()
    ctx = init_parallel(recipe.layout(1), timeout_s=600)
    record: dict = {}
    try:
        kt, pt, kl, pl = run_paired(recipe, dataset, ctx, record=record)
    finally:
        destroy_parallel()
    gpu = ctx.device.type == "cuda"
    bf16 = recipe.precision == "bf16"
    tokens = recipe.parallel.global_batch * recipe.seq_length
    fpt = flops_per_token(recipe.model, recipe.seq_length, causal=True)
    peak = peak_flops_per_device("bfloat16" if bf16 else "float32") if gpu else None

    def side(times):
        wall = [w for w, _ in times[warmup:]]
        med = statistics.median(wall)
        tps = tokens / med
        return {
            "n": len(wall),
            "median_s": med,
            "min_s": min(wall),
            "max_s": max(wall),
            "tokens_per_s": tps,
            "tflops_per_device": tps * fpt / 1e12,
            "mfu": tps * fpt / peak if peak else None,
        }

    kiln, plain = side(kt), side(pt)
    timed = record.get("kiln_metrics", [])[warmup:]
    callback = {
        k: statistics.median(m[k] for m in timed) for k in ("step_time_s", "tokens_per_s", "tflops_per_device", "mfu")
        if timed and all(k in m for m in timed)
    }  # fmt: skip
    ratios = [p[0] / k[0] for k, p in zip(kt[warmup:], pt[warmup:])]
    m, par = recipe.model, recipe.parallel
    out = {
        "device": torch.cuda.get_device_name() if gpu else "cpu (dry run)",
        "dry_run": bool(args.dry_run),
        "recipe": _rel(args.gpu_recipe),
        "overrides": overrides,
        "model": {
            "parameters": sum(math.prod(shape) for shape in full_shapes(m).values()),
            "hidden_size": m.hidden_size,
            "num_hidden_layers": m.num_hidden_layers,
            "vocab_size": m.vocab_size,
            "fused_kernels": m.fused_kernels,
            "attention_backend": m.attention_backend,
        },
        "precision": recipe.precision,
        "seq_length": recipe.seq_length,
        "micro_batch": par.micro_batch,
        "global_batch": par.global_batch,
        "zero_stage": par.zero_stage,
        "tokens_per_step": tokens,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "warmup_steps": warmup,
        "kiln": kiln,
        "kiln_throughput_callback": callback,
        "plain": plain,
        "ratio": kiln["tokens_per_s"] / plain["tokens_per_s"],
        "paired_ratio": statistics.median(ratios) if ratios else None,
        "goal_ratio": 0.95,
        "goal_mfu": 0.5,
        "losses": {"kiln": kl, "plain": pl},
        "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(kl, pl)),
        "static_memory_gib": record.get("static_memory_gib"),
        "peak_memory_gib": record.get("peak_memory_gib"),
    }
    return out


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def gpu_text(out: dict) -> str:
    k, p, cb = out["kiln"], out["plain"], out["kiln_throughput_callback"]

    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    lines = [
        f"### {out['device']}: kiln trainer vs plain PyTorch loop, {out['model']['parameters'] / 1e9:.2f}B Llama, "
        f"seq {out['seq_length']}, {out['precision']}" + (" (DRY RUN: tiny model on CPU)" if out["dry_run"] else ""),
        "",
        f"{out['recipe']} {' '.join(out['overrides'])}; {out['tokens_per_step']} tokens/step, "
        f"{out['flops_per_token'] / 1e9:.3f} GFLOP/token, peak {out['peak_flops'] / 1e12 if out['peak_flops'] else 0:.0f} "
        f"TFLOP/s; median of {k['n']} paired steps after {out['warmup_steps']} warm-up steps.",
        "",
        "| loop | median step s | tokens/s | TFLOP/s | MFU | peak GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    peaks = out.get("peak_memory_gib") or {}
    for name, s in (("plain", p), ("kiln", k)):
        lines.append(
            f"| {name} | {s['median_s']:.4f} | {s['tokens_per_s']:,.0f} | {s['tflops_per_device']:.1f} | "
            f"{pct(s['mfu'])} | {peaks.get(name, 0):.1f} |"
        )
    if cb:
        lines.append(
            f"| kiln, its Throughput callback (engine step only) | {cb.get('step_time_s', 0):.4f} | "
            f"{cb.get('tokens_per_s', 0):,.0f} | {cb.get('tflops_per_device', 0):.1f} | {pct(cb.get('mfu'))} | |"
        )
    lines += [
        "",
        f"kiln / plain tokens/s: **{out['ratio']:.3f}x** (goal >= 0.95x; paired median {out['paired_ratio']:.3f}x); "
        f"largest relative difference of the per-step losses {out['max_loss_rel_diff']:.1e}; "
        f"static memory (both models) {out['static_memory_gib'] or 0:.1f} GiB.",
        "",
    ]
    return "\n".join(lines)


def report(cmd: str, cpu: dict, gpu: dict | None, gpu_reason: str) -> str:
    import deepspeed
    import torch

    r, m = cpu["recipe"], cpu["recipe"].model
    n_params = (
        m.vocab_size * m.hidden_size
        + m.num_hidden_layers
        * (
            m.hidden_size * m.head_dim * (m.num_attention_heads * 2 + m.num_key_value_heads * 2)
            + 3 * m.hidden_size * m.intermediate_size
            + 2 * m.hidden_size
        )
        + m.hidden_size
    )
    lines = [
        f"## {datetime.datetime.now():%Y-%m-%d %H:%M} — {platform.node() or 'machine'}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "",
        f"Command: `{cmd}`",
        f"torch {torch.__version__} ({cpu['threads']} threads), deepspeed {deepspeed.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        f"### {cpu['device']}: kiln trainer (1 rank) vs plain PyTorch loop",
        "",
        f"Model: KilnLlama hidden {m.hidden_size}, {m.num_hidden_layers} layers, {m.num_attention_heads} heads "
        f"({m.num_key_value_heads} KV), FFN {m.intermediate_size}, vocab {m.vocab_size}, tied, "
        f"{n_params / 1e6:.1f}M parameters; fp32; seq {r.seq_length} (4 packed documents per sample); "
        f"micro-batch {r.parallel.micro_batch}, global batch {r.parallel.global_batch} "
        f"({cpu['tokens_per_step']} tokens/step, "
        f"{r.parallel.global_batch // r.parallel.micro_batch} micro-batches); AdamW (kiln: "
        f"`optimizer.implementation: {r.optimizer.implementation}`; plain: `torch.optim.AdamW(params)`'s default), "
        "clip 1.0; "
        f"kiln recipe ZeRO stage {r.parallel.zero_stage} (at DP = 1 the engine runs ZeRO 0 without the 1-rank "
        "gradient all-reduce and clips itself: kiln.pretrain.engine.zero.effective_zero_stage)" + ".",
        "",
        "| loop | timed steps | median step s (wall) | min s | max s | tokens/s (wall) | median CPU s/step | "
        "tokens per CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in ("plain", "kiln"):
        s = cpu[side]
        lines.append(
            f"| {side} | {s['n']} | {s['median_s']:.4f} | {s['min_s']:.4f} | {s['max_s']:.4f} | "
            f"{s['tokens_per_s']:,.0f} | {s['cpu_median_s']:.4f} | {s['tokens_per_cpu_s']:,.0f} |"
        )
    goal = "meets" if cpu["ratio"] >= 1.0 else "misses"
    lines += [
        "",
        f"Ratio kiln / plain tokens/s: **{cpu['ratio']:.3f}x** ({goal} issue 9's >= 1.0x goal); median of the "
        f"per-step paired ratios: {cpu['paired_ratio']:.3f}x; ratio of CPU time per step (plain / kiln): "
        f"{cpu['cpu_ratio']:.3f}x. "
        f"Largest relative difference between the two sides' per-step losses: {cpu['max_loss_rel_diff']:.1e}.",
        "",
        "### GPU: MFU of a ~1B model at seq 4096, bf16",
        "",
    ]
    if gpu is None:
        lines.append(f"Not run: {gpu_reason}.")
    else:
        g = gpu["recipe"]
        mfu = f"{100 * gpu['mfu']:.1f}%" if gpu["mfu"] is not None else "n/a (device not in the peak table)"
        lines += [
            f"Device: {gpu['device']} (peak {gpu['peak'] / 1e12 if gpu['peak'] else float('nan'):.0f} TFLOP/s "
            f"bf16). Micro-batch {g.parallel.micro_batch}, global batch {g.parallel.global_batch}, activation "
            f"checkpointing {g.parallel.activation_checkpointing}, ZeRO {g.parallel.zero_stage}.",
            "",
            f"median step {gpu['median_s']:.3f}s, {gpu['tokens_per_s']:,.0f} tokens/s, "
            f"{gpu['tflops']:.1f} TFLOP/s, **MFU {mfu}** ({gpu['flops_per_token'] / 1e9:.2f} GFLOP/token), "
            f"peak memory {gpu['max_memory_gib']:.1f} GiB.",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--zero-stage", type=int, default=1, help="kiln side's ZeRO stage (the recipes' default: 1)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument(
        "--optimizer-implementation",
        default="fused",
        choices=["fused", "foreach", "for-loop"],
        help="kiln side's optimizer.implementation (default: the recipes' default, fused; the plain loop always "
        "runs torch.optim.AdamW's default)",
    )
    p.add_argument(
        "--skip-dp1-allreduce",
        action="store_true",
        help="with --zero-stage 0: turn off DeepSpeed's gradient all-reduce, which has nothing to do at DP = 1",
    )
    p.add_argument("--profile", action="store_true", help="cProfile the kiln side, print the top functions")
    p.add_argument("--gpu-steps", type=int, default=10, help="timed steps (the MFU run, and --gpu per side)")
    p.add_argument("--gpu-micro-batch", type=int, default=1)
    p.add_argument("--gpu-global-batch", type=int, default=8)
    p.add_argument("--gpu-activation-checkpointing", action="store_true")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/train.md")
    g = p.add_argument_group("--gpu: the ~1B recipe on one GPU, kiln vs the plain loop (bf16)")
    g.add_argument("--gpu", action="store_true", help="run only the GPU comparison (see the module docstring)")
    g.add_argument("--gpu-recipe", default=GPU_RECIPE, help="recipe of the GPU comparison")
    g.add_argument("--gpu-warmup", type=int, default=3, help="untimed steps first (Triton compiles in the first)")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeat)")
    g.add_argument("--json-out", help="write the GPU comparison as JSON to this file")
    g.add_argument("--dry-run", action="store_true", help="with --gpu: the same code path on CPU with a tiny model")
    args = p.parse_args(argv)

    if args.gpu:
        if args.dry_run:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        out = gpu_comparison(args)
        text = gpu_text(out)
        print(text, flush=True)
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
            print(f"wrote {args.json_out}")
        if not args.no_record and not args.dry_run:
            with open(RESULTS, "a") as f:
                f.write(f"## {datetime.datetime.now():%Y-%m-%d %H:%M} — `python -m benchmarks.train "
                        f"{' '.join(sys.argv[1:])}`\n\n{text}\n")  # fmt: skip
        return 0

    cpu = cpu_comparison(args)
    gpu, reason = None, "no CUDA device on this machine (torch.cuda.is_available() is False)"
    if _cuda():
        gpu = gpu_mfu(args)
    text = report(" ".join(["python -m benchmarks.train", *sys.argv[1:]]), cpu, gpu, reason)
    print(text)
    if "profile" in cpu:
        print(cpu["profile"])
    if not args.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        new = not RESULTS.exists()
        with open(RESULTS, "a") as f:
            if new:
                f.write("# Trainer throughput: kiln vs a plain PyTorch loop; GPU MFU\n\n")
                f.write("Recorded by `benchmarks/train.py` (see its docstring for what each side runs).\n\n")
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
