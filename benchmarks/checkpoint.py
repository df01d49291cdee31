"""Checkpoint save/load: today's full-gather format vs sharded (DCP) checkpoints, per rank, on CPU (gloo).

Both sides save the same state of the same engine, through the trainer's own functions and the same
``CheckpointManager`` (tmp dir, COMPLETE manifest, rename, ``latest``):

- full: ``save_full_train_checkpoint``: every rank gathers the full fp32 model (``engine.full_model_state``) and
  AdamW state (``full_optimizer_state``), rank 0 writes ``model.safetensors`` + ``optimizer.pt``; load
  (``restore_checkpoint`` on that directory): every rank reads both files whole and slices its part;
- sharded: ``save_train_checkpoint``: every rank writes the pieces it holds (TP slices, ZeRO fragments) into its
  own DCP file; load: every rank reads its own pieces, into the live buffers.

The model: a Llama of hidden 768, 12 layers (12 heads, 4 KV heads, FFN 2048), vocabulary 32000, tied embeddings:
~100M parameters, fp32 + AdamW after one training step, i.e. a full state (weights, fp32 masters, two moments as
a checkpoint holds them) of 16 bytes per parameter, ~1.6 GB.

Per rank and operation: wall seconds, CPU seconds of the process (all its threads: DCP's and torch's), and the
peak RSS increase: ``VmHWM`` (reset through ``/proc/self/clear_refs`` just before, after a ``malloc_trim``) minus
``VmRSS`` before the call. Peak RSS is not affected by other jobs on the machine; wall time is, so the two sides
run interleaved (full, sharded, sharded, full, ...) and the median of ``--repeats`` runs is reported, with CPU
seconds beside it. The goal (issue 9): sharded per-rank peak at most 1/world of the full state plus a constant,
and sharded save time at most half of full-gather's.

Usage (from the repository root; appends to benchmarks/results/checkpoint.md with the command and machine):

    python -m benchmarks.checkpoint                      # 2 and 4 ranks, the layouts below, 3 repeats
    python -m benchmarks.checkpoint --ranks 2 --repeats 1 --small --no-record    # a quick check, tiny model
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "checkpoint.md"
TINY = str(REPO / "recipes" / "pretrain" / "tiny.yaml")
MODEL = [
    "model.vocab_size=32000",
    "model.hidden_size=768",
    "model.intermediate_size=2048",
    "model.num_hidden_layers=12",
    "model.num_attention_heads=12",
    "model.num_key_value_heads=4",
    "model.head_dim=64",
    "model.max_position_embeddings=256",
]
SMALL = ["model.vocab_size=512", "model.hidden_size=128", "model.intermediate_size=256"]
RUN = ["parallel.micro_batch=1", "train_steps=1", "schedule.warmup_steps=0", "log_interval=1000"]
LAYOUTS = {  # name -> (ranks, overrides)
    "DP2 ZeRO-1": (2, ["parallel.zero_stage=1"]),
    "TP2": (2, ["parallel.tp=2"]),
    "DP4 ZeRO-1": (4, ["parallel.zero_stage=1"]),
    "TP2 x DP2 ZeRO-1": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
}
OPS = ("save full", "save sharded", "load full", "load sharded")


def _mib(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _measure(fn, barrier) -> dict:
    """(wall s, CPU s, peak RSS increase MiB) of ``fn()`` on this rank, between barriers."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0, wall0, cpu0 = _mib("VmRSS"), time.perf_counter(), time.process_time()
    fn()
    barrier()
    return {
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "peak_mib": _mib("VmHWM") - rss0,
        "rss_before_mib": rss0,
    }


def _worker(rank: int, world_size: int, overrides: list[str], root: str, repeats: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import contextlib
    import io

    import torch.distributed as dist

    from kiln.parallel.topology import init_parallel
    from kiln.pretrain.callbacks.base import TrainState
    from kiln.pretrain.checkpoint import CheckpointManager
    from kiln.pretrain.checkpointing import restore_checkpoint, save_full_train_checkpoint, save_train_checkpoint
    from kiln.pretrain.engine import TrainEngine
    from kiln.pretrain.recipe import load_recipe
    from kiln.pretrain.train import train

    recipe = load_recipe(TINY, [*overrides, f"run_dir={root}/run", "checkpoint.keep_last=2"])
    ctx = init_parallel(recipe.layout(world_size), timeout_s=1800)
    engine = TrainEngine(recipe, ctx)
    state = train(recipe, ctx=ctx, engine=engine, loggers=False)  # one step: AdamW state exists
    managers = {"full": CheckpointManager(f"{root}/full", 2), "sharded": CheckpointManager(f"{root}/sharded", 2)}
    save = {"full": save_full_train_checkpoint, "sharded": save_train_checkpoint}
    quiet = contextlib.redirect_stdout(io.StringIO())
    runs: dict[str, list[dict]] = {op: [] for op in OPS}
    for phase in ("save", "load"):
        for r in range(repeats):
            for side in ("full", "sharded") if r % 2 == 0 else ("sharded", "full"):
                if phase == "save":
                    state.step = 1 + r  # a new checkpoint directory each time

                    def op(side=side):
                        save[side](managers[side], recipe, engine, state, ctx)
                else:
                    ckpt = managers[side].latest()

                    def op(ckpt=ckpt):
                        restore_checkpoint(ckpt, engine, TrainState(rank=ctx.rank, world_size=ctx.world_size), ctx)

                with quiet:
                    runs[f"{phase} {side}"].append(_measure(op, dist.barrier))
    sharded = managers["sharded"].latest() / "state"
    mine = [f for f in sharded.iterdir() if f.name.startswith(f"__{rank}_")]
    out = {
        "params_here": engine.num_parameters(),
        "runs": runs,
        "sharded_bytes_here": sum(f.stat().st_size for f in mine),
    }
    if rank == 0:
        full = managers["full"].latest()
        out["full_bytes"] = sum((full / f).stat().st_size for f in ("model.safetensors", "optimizer.pt"))
        out["params_total"] = sum(t.numel() for t in engine.full_model_state().values())
    else:
        engine.full_model_state()  # collective
    return out


def _fmt_row(op: str, results: list[dict]) -> str:
    cells = []
    for r in results:
        runs = r["runs"][op]
        wall = statistics.median(x["wall_s"] for x in runs)
        cpu = statistics.median(x["cpu_s"] for x in runs)
        peak = max(x["peak_mib"] for x in runs)
        cells.append(f"{wall:.2f} s / {cpu:.2f} CPU s / +{peak:,.0f} MiB")
    return f"| {op} | " + " | ".join(cells) + " |"


def run_layout(name: str, repeats: int, small: bool) -> tuple[str, dict]:
    from kiln.pretrain.testing import run_distributed

    world, layout = LAYOUTS[name]
    root = tempfile.mkdtemp(prefix="kiln-ckpt-bench-")
    try:
        overrides = [*MODEL, *(SMALL if small else []), *RUN, f"parallel.global_batch={world}", *layout]
        results = run_distributed(_worker, world, overrides, root, repeats, timeout=3600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = results[0]["params_total"]
    full_state_mib = 16 * n / 2**20
    lines = [
        f"### {name} ({world} ranks), {n / 1e6:.1f}M parameters, full state {full_state_mib:,.0f} MiB "
        f"(1/{world}: {full_state_mib / world:,.0f} MiB)",
        "",
        "| median of " + str(repeats) + " (peak: max) | " + " | ".join(f"rank {r}" for r in range(world)) + " |",
        "|---|" + "---:|" * world,
        *(_fmt_row(op, results) for op in OPS),
        "| bytes written | "
        + " | ".join(
            f"sharded {r['sharded_bytes_here'] / 2**20:,.0f} MiB"
            + (f", full {r['full_bytes'] / 2**20:,.0f} MiB" if i == 0 else "")
            for i, r in enumerate(results)
        )
        + " |",
    ]

    def med(op: str, key: str) -> float:  # the slowest rank's median: a save is done when every rank is
        return max(statistics.median(x[key] for x in r["runs"][op]) for r in results)

    peak_sharded = max(x["peak_mib"] for r in results for op in ("save sharded", "load sharded") for x in r["runs"][op])
    summary = {
        "save ratio (sharded / full, wall)": med("save sharded", "wall_s") / med("save full", "wall_s"),
        "save ratio (sharded / full, CPU)": med("save sharded", "cpu_s") / med("save full", "cpu_s"),
        "load ratio (sharded / full, wall)": med("load sharded", "wall_s") / med("load full", "wall_s"),
        "sharded peak / (full state / world)": peak_sharded / (full_state_mib / world),
        "sharded peak MiB": peak_sharded,
    }
    lines += ["", "; ".join(f"{k}: {v:.2f}" for k, v in summary.items()), ""]
    return "\n".join(lines), summary


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="run the layouts of these world sizes")
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), help="only these layouts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a small model (a quick check of the script)")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/checkpoint.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    names = args.layouts or [n for n, (w, _) in LAYOUTS.items() if w in args.ranks]
    load_before = os.getloadavg()
    started = datetime.datetime.now()
    sections = []
    for name in names:
        text, _ = run_layout(name, args.repeats, args.small)
        print(text, flush=True)
        sections.append(text)
    load_after = os.getloadavg()
    if not args.no_record:
        from benchmarks.record import append_result

        command = "python -m benchmarks.checkpoint " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (
            f"## {started:%Y-%m-%d %H:%M} `{command.strip()}`\n\n"
            f"Machine: {machine()}. Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after: other "
            "jobs ran on the machine during the run (wall times are affected, peak RSS is not).\n\n"
            "Cells: wall seconds / CPU seconds of the process / peak RSS increase, per rank.\n"
        )
        append_result(
            RESULTS,
            "Checkpoint save/load: full gather vs sharded",
            "benchmarks/checkpoint.py",
            header + "\n" + "\n".join(sections),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
