"""Checkpoint and resume of the trainer (issue 5 acceptance: exact resume, SIGTERM, layout-change resume).

* Exact resume (1 rank, separate processes as a real job): an uninterrupted 12-step run through the CLI is the
  reference; a second run is SIGKILLed at a random step after a checkpoint exists, a half-written checkpoint is
  left beside it, and ``kiln train ... resume=true`` continues: every step after the checkpoint
  has bitwise the reference loss and gradient norm (CPU fp32).
* SIGTERM: the run finishes its step, writes a checkpoint of that step, exits 0; resuming it is bitwise exact too.
* Layout change (one 4-rank launch, one 1-rank launch): TP2xPP2 trains 6 steps saving at step 3; resuming that
  checkpoint at TP2xPP2 (bitwise, 4 ranks), at PP2xDP2 and at 1 rank gives the uninterrupted run's losses
  within 1e-4 relative, and every step reads the same global samples (indices and token checksums). bf16
  (fp32 masters) resumes bitwise at 1 rank.
* ZeRO (one 2-rank launch): a ZeRO-3 checkpoint resumes bitwise at ZeRO-3 and within 1e-4 at ZeRO 2, 1, 0.

Every checkpoint here is in the sharded format (each rank wrote its own pieces, ``kiln.pretrain.engine.
sharded_state``); the older full format is tested in test_sharded_checkpoint.py.

This file is also the worker for the killed/terminated runs (``python tests/test_train_resume.py RUN_DIR
DELAY_S [overrides]``): the trainer's ``train`` with a callback that sleeps ``DELAY_S`` per step, so that a
signal reliably lands in the middle of the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "pretrain" / "tiny.yaml")
STEPS = 12
COMMON = [f"train_steps={STEPS}", "log_interval=1", "checkpoint.interval=2", "checkpoint.keep_last=10"]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


# ------------------------------------------------------------------------------------------------ helpers


def _cli(run_dir: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kiln", "train", TINY, *COMMON, f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _slow_worker(run_dir: Path, delay_s: float, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, str(run_dir), str(delay_s), *COMMON, f"run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad norm) from metrics.jsonl (a later record of the same step wins: the resumed run's)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out[r["step"]] = (r["loss"], r["grad_norm"])
    return out


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the condition held:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, tuple[float, float]]:
    run_dir = tmp_path_factory.mktemp("reference")
    _cli(run_dir)
    ref = _metrics(run_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS][0] < ref[1][0] - 0.3  # it learns
    return ref


# ------------------------------------------------------------------------------------------------ 1 rank


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, reference):
    from kiln.pretrain.checkpoint import checkpoint_format, find_latest_checkpoint, load_train_state

    kill_after = random.Random().choice([2, 4, 6, 8])  # a random checkpoint step to kill the run after
    ckpts = tmp_path / "checkpoints"
    proc = _slow_worker(tmp_path, 0.25)
    _wait_for(lambda: (ckpts / f"step_{kill_after:07d}" / "COMPLETE").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = find_latest_checkpoint(ckpts)
    assert saved is not None and checkpoint_format(saved) == "sharded"
    resumed_at = load_train_state(saved).step
    assert kill_after <= resumed_at < STEPS  # killed mid-run
    # a newer checkpoint that is not complete (no manifest) and that ``latest`` names: resume must fall back to
    # the newest complete one, with a warning
    half = ckpts / f"step_{resumed_at + 2:07d}"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    (ckpts / "latest").write_text(half.name + "\n")

    proc2 = _cli(tmp_path, "resume=true")
    assert f"resumed from {saved}" in proc2.stdout
    assert f"step {resumed_at}, {resumed_at * 8} samples consumed" in proc2.stdout
    assert f"skipping incomplete checkpoint {half}" in proc2.stderr
    got = _metrics(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # the killed run's steps and the resumed ones: bitwise the reference
        assert got[step] == reference[step], f"step {step} (resumed at {resumed_at})"


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, reference):
    from kiln.pretrain.checkpoint import find_latest_checkpoint, load_train_state

    proc = _slow_worker(tmp_path, 0.25, "checkpoint.interval=0")  # no periodic saves: only the signal's
    _wait_for(lambda: _steps_logged(tmp_path) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    done = max(_metrics(tmp_path))
    assert 3 <= done < STEPS
    saved = find_latest_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and saved.name == f"step_{done:07d}"
    assert load_train_state(saved).step == done
    assert load_train_state(saved).consumed_samples == done * 8

    _cli(tmp_path, "resume=true", "checkpoint.interval=0")
    got = _metrics(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == reference[s] for s in got), f"stopped at {done}"


def test_resume_from_a_path_without_checkpoint_is_a_clear_error(tmp_path):
    from kiln.config import ConfigError
    from kiln.pretrain.checkpointing import resolve_resume
    from kiln.pretrain.recipe import load_recipe

    (tmp_path / "step_0000004").mkdir()  # half-written, nothing complete
    recipe = load_recipe(TINY, [f"resume={tmp_path}"])
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_resume(load_recipe(TINY, [f"resume={tmp_path / 'nope'}"]))
    fresh = load_recipe(TINY, ["resume=true", f"checkpoint.dir={tmp_path / 'empty'}"])
    assert resolve_resume(fresh) is None  # resume=true with nothing saved yet: start from step 0


# ------------------------------------------------------------------------------------------------ layouts


class _Recorded:
    """The dataset, noting which global samples (index, token checksum) this rank reads."""

    def __init__(self, dataset):
        self.dataset, self.read = dataset, []

    def __getitem__(self, i):
        sample = self.dataset[i]
        self.read.append((int(i), zlib.crc32(sample["input_ids"].numpy().tobytes())))
        return sample


def _layout_runs(rank: int, world_size: int, runs: list[tuple[str, list[str]]]) -> dict:
    """In each spawned rank: train every run in turn; per run, per step: loss, grad norm, samples read here."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.callbacks.base import Callback
    from kiln.pretrain.recipe import load_recipe
    from kiln.pretrain.train import build_dataset, train

    class Record(Callback):
        def __init__(self, data):
            self.data, self.steps = data, []

        def on_step_end(self, state, metrics):
            self.steps.append((state.step, float(metrics["loss"]), float(metrics["grad_norm"])))

        def on_train_end(self, state):
            # batches are prepared ahead on a thread, so a read is attributed to its step by its index (global
            # batch 8: step s holds samples 8(s-1) ... 8s-1); a read for a step that did not train would show
            by_step: dict[int, list] = {}
            for i, crc in self.data.read:
                by_step.setdefault(i // 8 + 1, []).append((i, crc))
            assert set(by_step) <= {s for s, _, _ in self.steps}, sorted(by_step)
            self.steps = [(s, loss, norm, sorted(by_step.get(s, []))) for s, loss, norm in self.steps]

    out = {}
    for name, overrides in runs:
        recipe = load_recipe(TINY, ["train_steps=6", "log_interval=1000", "checkpoint.keep_last=10", *overrides])
        ctx = init_parallel(recipe.layout(world_size), timeout_s=120)
        data = _Recorded(build_dataset(recipe))
        record = Record(data)
        train(recipe, [record], dataset=data, ctx=ctx, loggers=False)
        out[name] = record.steps
        destroy_parallel()
    return out


@pytest.mark.slow
def test_resume_at_another_layout(tmp_path):
    from kiln.pretrain.checkpoint import checkpoint_format
    from kiln.pretrain.testing import run_distributed

    saved, ck = tmp_path / "tp2pp2" / "step_0000003", tmp_path / "tp2pp2"
    four = run_distributed(
        _layout_runs,
        4,
        [
            (
                "TP2xPP2",
                ["parallel.tp=2", "parallel.pp=2", "checkpoint.interval=3", f"checkpoint.dir={ck}", f"run_dir={ck}"],
            ),
            ("TP2xPP2 resumed", ["parallel.tp=2", "parallel.pp=2", f"resume={saved}", f"run_dir={tmp_path}/a"]),
            ("PP2xDP2 resumed", ["parallel.pp=2", f"resume={saved}", f"run_dir={tmp_path}/b"]),
        ],
    )
    assert checkpoint_format(saved) == "sharded"  # every rank wrote its own pieces; nothing was gathered
    assert sorted(p.name for p in (saved / "state").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    bf = tmp_path / "bf16"
    one = run_distributed(
        _layout_runs,
        1,
        [
            ("1 rank resumed", [f"resume={saved}", f"run_dir={tmp_path}/c"]),
            # bf16 weights with fp32 masters (DeepSpeed's BF16_Optimizer): the masters come back exactly
            ("bf16", ["precision=bf16", "checkpoint.interval=3", f"checkpoint.dir={bf}", f"run_dir={bf}"]),
            ("bf16 resumed", ["precision=bf16", f"resume={bf / 'step_0000003'}", f"run_dir={tmp_path}/d"]),
        ],
    )[0]
    assert one["bf16 resumed"] == one["bf16"][3:]  # bitwise

    def merged(results: list[dict], name: str) -> list[tuple]:
        """Per step: (step, loss, grad norm, samples read by all ranks together) — checked equal on all ranks."""
        steps = []
        for i, (step, loss, norm, _) in enumerate(results[0][name]):
            for r in results:
                assert r[name][i][:3] == (step, loss, norm), f"{name}: ranks disagree at step {step}"
            steps.append((step, loss, norm, sorted({s for r in results for s in r[name][i][3]})))
        return steps

    ref = merged(four, "TP2xPP2")
    assert [s[0] for s in ref] == [1, 2, 3, 4, 5, 6]
    for step, _, _, samples in ref:  # step s reads the global samples 8(s-1) ... 8s-1
        assert [i for i, _ in samples] == list(range(8 * (step - 1), 8 * step))
    tail = ref[3:]
    same_layout = merged(four, "TP2xPP2 resumed")
    assert same_layout == tail  # bitwise, 4 ranks
    for name, got in (
        ("PP2xDP2 resumed", merged(four, "PP2xDP2 resumed")),
        ("1 rank", merged([one], "1 rank resumed")),
    ):
        assert [s[0] for s in got] == [4, 5, 6], name
        for (step, loss, norm, samples), (_, ref_loss, ref_norm, ref_samples) in zip(got, tail):
            assert loss == pytest.approx(ref_loss, rel=1e-4), f"{name}: loss at step {step}"
            assert norm == pytest.approx(ref_norm, rel=1e-3), f"{name}: grad norm at step {step}"
            assert samples == ref_samples, f"{name}: data at step {step}"


@pytest.mark.slow
def test_resume_across_zero_stages(tmp_path):
    """ZeRO-3 partitions (padded flat fp32 partitions) saved and resumed at ZeRO 3 (bitwise), 2, 1 and without
    ZeRO, on 2 data-parallel ranks."""
    from kiln.pretrain.checkpoint import checkpoint_format
    from kiln.pretrain.testing import run_distributed

    ck = tmp_path / "zero3"
    saved = ck / "step_0000003"
    runs = [("ZeRO-3", ["parallel.zero_stage=3", "checkpoint.interval=3", f"checkpoint.dir={ck}", f"run_dir={ck}"])]
    runs += [
        (f"ZeRO-{stage} resumed", [f"parallel.zero_stage={stage}", f"resume={saved}", f"run_dir={tmp_path}/{stage}"])
        for stage in (3, 2, 1, 0)
    ]
    results = run_distributed(_layout_runs, 2, runs)
    assert checkpoint_format(saved) == "sharded"
    ref = results[0]["ZeRO-3"]
    assert [s[0] for s in ref] == [1, 2, 3, 4, 5, 6]
    for stage in (3, 2, 1, 0):
        name = f"ZeRO-{stage} resumed"
        for rank in range(2):
            got = results[rank][name]
            assert [s[0] for s in got] == [4, 5, 6], name
            assert [s[3] for s in got] == [s[3] for s in results[rank]["ZeRO-3"][3:]], f"{name}: data"
            for (step, loss, norm, _), (_, ref_loss, ref_norm, _) in zip(got, ref[3:]):
                if stage == 3:
                    assert (loss, norm) == (ref_loss, ref_norm), f"{name}: step {step} not bitwise"
                assert loss == pytest.approx(ref_loss, rel=1e-4), f"{name}: loss at step {step}"
                if stage > 0:  # without ZeRO, DeepSpeed's engine does not report the gradient norm (nan)
                    assert norm == pytest.approx(ref_norm, rel=1e-3), f"{name}: grad norm at step {step}"


# ------------------------------------------------------------------------------------------------ worker


def _worker_main(argv: list[str]) -> int:
    """``RUN_DIR DELAY_S overrides...``: train like ``kiln train`` but ``DELAY_S`` slower per step."""
    from kiln.pretrain.callbacks.base import Callback
    from kiln.pretrain.recipe import load_recipe
    from kiln.pretrain.train import train

    delay = float(argv[1])

    class Slow(Callback):
        def on_step_end(self, state, metrics):
            time.sleep(delay)

    return train(load_recipe(TINY, argv[2:]), [Slow()]).exit_code


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
