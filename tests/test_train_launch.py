"""The entry point under torchrun, and collective timeouts (a stuck rank ends the job instead of hanging it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.pretrain.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "pretrain" / "tiny.yaml"


@pytest.mark.slow
def test_torchrun_pipeline_run_writes_metrics(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "kiln", "train", str(TINY),
        "parallel.pp=2", "train_steps=4", "log_interval=2", f"run_dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]  # rank 0 only
    # the kiln logger prints informational lines on rank 0 only: which attention path runs is said once per run
    assert proc.stderr.count("kiln: attention runs the ") == 1, proc.stderr[-3000:]
    assert "Transformer Engine and Apex are not installed" not in proc.stderr  # third-party warnings: run logs
    assert "Transformer Engine and Apex are not installed" in (tmp_path / "logs" / "train_rank0.log").read_text()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["global_batch"] == 8 and r["tokens"] == 8 * 32 for r in records)


def _stuck_peer(rank: int, world_size: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from kiln.parallel.layout import Layout
    from kiln.parallel.topology import destroy_parallel, init_parallel

    ctx = init_parallel(Layout(tp=1, pp=1, dp=2), timeout_s=2)
    later_group = dist.new_group([0, 1])  # created the way DeepSpeed creates its groups: no explicit timeout
    dist.barrier()
    out = {}
    if rank == 0:
        for name, group in (("megatron dp group", ctx.dp_group), ("new group", later_group)):
            start = time.monotonic()
            try:
                dist.all_reduce(torch.ones(1), group=group)
                out[name] = ("no error", time.monotonic() - start)
            except RuntimeError as e:
                out[name] = (str(e)[:200], time.monotonic() - start)
    else:
        time.sleep(8)  # a stuck rank: never joins rank 0's collectives
    destroy_parallel()
    return out


@pytest.mark.slow
def test_collectives_time_out_instead_of_hanging():
    result = run_distributed(_stuck_peer, 2, timeout=120)[0]
    for name, (message, seconds) in result.items():
        assert message != "no error", name
        assert seconds < 6, f"{name}: waited {seconds:.1f}s with a 2 s timeout"
