"""Checkpoint files: atomic write + latest pointer, crash fallback, keep-K, RNG/train state, full state, signals."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from kiln.pretrain import sharded_io
from kiln.pretrain.callbacks.base import TrainState
from kiln.pretrain.checkpoint import (
    LATEST,
    MANIFEST,
    SHARDED_DIR,
    CheckpointError,
    CheckpointManager,
    checkpoint_format,
    find_latest_checkpoint,
    is_complete,
    load_full_state,
    load_rng_state,
    load_train_state,
    resume_checkpoint,
    save_checkpoint,
    save_full_state,
    save_rng_state,
    save_train_state,
)
from kiln.pretrain.shards import Shards

FORMATS = ["sharded", "full"]
SHARD_FILE = "state/__0_0.distcp"  # the one rank's DCP file of a sharded checkpoint written by one process


def _writer(step: int, fmt: str = "sharded"):
    """The model/optimizer part as the trainer writes it: sharded (DCP files under state/, here from one process),
    or the older full format."""

    def write(d):
        if fmt == "sharded":
            flat = torch.full((10,), float(step))
            w = Shards((4,), [((0,), flat.narrow(0, 2, 4))])  # a view into a larger buffer, as ZeRO's fragments
            sharded_io.save({"model.w": w, "optimizer.step": torch.tensor(step)}, d / SHARDED_DIR, no_dist=True)
            (d / "meta.json").write_text(json.dumps({"step": step}))
        else:
            save_full_state(d, {"w": torch.full((4,), float(step))}, {"step": step}, {"step": step})
        save_train_state(d, TrainState(step=step, consumed_samples=8 * step, tokens=8 * step * 16))

    return write


def _read_weights(ckpt, fmt: str) -> list[float]:
    if fmt == "full":
        return load_full_state(ckpt)[0]["w"].tolist()
    w = torch.zeros(4)
    sharded_io.load({"model.w": w}, ckpt / SHARDED_DIR, no_dist=True)
    return w.tolist()


def _model_file(fmt: str) -> str:
    return SHARD_FILE if fmt == "sharded" else "model.safetensors"


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_commit_latest_and_keep_last(tmp_path, fmt):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (10, 20, 30, 40, 50):
        final = mgr.save(step, _writer(step, fmt))
        assert final.name == f"step_{step:07d}" and is_complete(final)
        assert (tmp_path / "ckpt" / LATEST).read_text().strip() == final.name
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["latest", "step_0000040", "step_0000050"]
    latest = find_latest_checkpoint(tmp_path / "ckpt")
    assert checkpoint_format(latest) == fmt and _read_weights(latest, fmt) == [50.0] * 4
    if fmt == "full":
        model, opt, meta = load_full_state(latest)
        assert opt == {"step": 50} and meta == {"step": 50}
    else:  # the manifest lists DCP's files too, its hidden index included
        files = json.loads((latest / MANIFEST).read_text())["files"]
        assert {"state/.metadata", SHARD_FILE} <= set(files)
        assert files[SHARD_FILE] == (latest / SHARD_FILE).stat().st_size
    st = load_train_state(latest)
    assert (st.step, st.consumed_samples, st.tokens) == (50, 400, 6400)
    assert find_latest_checkpoint(tmp_path / "empty") is None
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_crash_mid_write_keeps_previous_latest(tmp_path, caplog, fmt):
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root, keep_last=3)
    mgr.save(100, _writer(100, fmt))

    def crashing(d):
        _writer(200, fmt)(d)
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        mgr.save(200, crashing)
    assert (root / "step_0000200.tmp").is_dir() and not (root / "step_0000200").exists()
    assert find_latest_checkpoint(root).name == "step_0000100"
    # a final-named directory without its manifest (e.g. copied by hand, truncated) pointed to by latest
    broken = root / "step_0000300"
    broken.mkdir()
    save_full_state(broken, {"w": torch.zeros(2)})
    (root / LATEST).write_text("step_0000300\n")
    with caplog.at_level(logging.WARNING, logger="kiln.pretrain.checkpoint"):
        assert find_latest_checkpoint(root).name == "step_0000100"
    assert "step_0000300" in caplog.text and "not usable" in caplog.text
    # a truncated file in a manifest-complete checkpoint is detected too
    good = root / "step_0000100"
    with open(good / _model_file(fmt), "r+b") as f:
        f.truncate(10)
    assert not is_complete(good) and find_latest_checkpoint(root) is None
    # the next successful save cleans the stale tmp of step 200
    mgr.save(400, _writer(400, fmt))
    assert not (root / "step_0000200.tmp").exists() and find_latest_checkpoint(root).name == "step_0000400"


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from kiln.pretrain.checkpoint import CheckpointManager, save_full_state
        mgr = CheckpointManager({str(root)!r}, keep_last=2)
        mgr.save(1, lambda d: save_full_state(d, {{"w": torch.ones(3)}}))
        def slow(d):
            save_full_state(d, {{"w": torch.ones(1000)}})
            print("writing", flush=True)
            time.sleep(60)
        mgr.save(2, slow)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    latest = find_latest_checkpoint(root)
    assert latest.name == "step_0000001"
    assert load_full_state(latest)[0]["w"].tolist() == [1.0, 1.0, 1.0]


def test_rng_round_trip_is_bitwise(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(3), torch.rand(3)  # advance away from the seeded state
    save_rng_state(tmp_path, rank=1)
    expected = (random.random(), np.random.rand(5).tobytes(), torch.rand(5), torch.randn(4, generator=None))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_rng_state(tmp_path, rank=1)
    got = (random.random(), np.random.rand(5).tobytes(), torch.rand(5), torch.randn(4))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    with pytest.raises(CheckpointError, match="rank 0"):
        load_rng_state(tmp_path, rank=0)


def test_full_state_tied_weights_and_optimizer(tmp_path):
    emb = torch.randn(10, 4)
    model = {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.ones(4, dtype=torch.bfloat16)}
    lin = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_full_state(tmp_path, model, opt.state_dict(), {"tp": 2, "pp": 1})
    m, o, meta = load_full_state(tmp_path)
    assert torch.equal(m["embed.weight"], emb) and torch.equal(m["lm_head.weight"], emb)
    assert m["norm.weight"].dtype == torch.bfloat16 and meta == {"tp": 2, "pp": 1}
    assert torch.equal(o["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert load_full_state(tmp_path, load_optimizer=False)[1] is None
    with pytest.raises(CheckpointError, match="not found"):
        load_full_state(tmp_path / "nope")


def test_save_and_resume_checkpoint_round_trip(tmp_path, caplog):
    root = tmp_path / "ckpt"
    assert resume_checkpoint(root) is None
    mgr = CheckpointManager(root, keep_last=2)
    torch.manual_seed(0)
    state = TrainState(step=12, consumed_samples=96, tokens=96 * 32, nan_steps=1, should_save=True, should_stop=True)
    model = {"w": torch.randn(3, 3)}
    final = save_checkpoint(mgr, state, model, {"lr": 0.1}, {"layout": "tp2pp2"})
    expected = torch.rand(4)
    torch.manual_seed(123)
    ckpt, st, m, opt, meta = resume_checkpoint(root)
    assert ckpt == final and torch.equal(torch.rand(4), expected)
    assert (st.step, st.consumed_samples, st.tokens, st.nan_steps) == (12, 96, 3072, 1)
    assert not st.should_save and not st.should_stop
    assert torch.equal(m["w"], model["w"]) and opt == {"lr": 0.1} and meta == {"layout": "tp2pp2"}
    with caplog.at_level(logging.WARNING, logger="kiln.pretrain.checkpoint"):
        torch.manual_seed(5)
        resume_checkpoint(root, rank=3)
    assert "no RNG state for rank 3" in caplog.text and torch.equal(torch.rand(4), expected)


def test_a_background_save_is_committed_once_written(tmp_path):
    """``checkpoint.async_save``: the manager commits a step whose files are still being written only once they
    are; until then ``latest`` names the previous one; ``wait`` returns the committed directory."""
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root, keep_last=5)
    mgr.save(1, _writer(1))
    done = threading.Event()
    tmp = mgr.begin(2, clean=True)

    def written():
        assert done.wait(30)
        _writer(2)(tmp)  # the files land only now

    mgr.commit_when_written(2, written, commit=True)
    assert mgr.pending and not (root / "step_0000002").exists()
    assert find_latest_checkpoint(root).name == "step_0000001"
    with pytest.raises(CheckpointError, match="still pending"):
        mgr.commit_when_written(3, lambda: None, commit=True)
    done.set()
    final = mgr.wait()
    assert final == root / "step_0000002" and is_complete(final) and not mgr.pending
    assert (root / LATEST).read_text().strip() == "step_0000002" and _read_weights(final, "sharded") == [2.0] * 4
    assert mgr.wait() is None  # nothing pending any more
    # a rank that does not commit only waits for its own files
    mgr.begin(3, clean=True)
    mgr.commit_when_written(3, lambda: None, commit=False)
    assert mgr.wait() == root / "step_0000003" and not (root / "step_0000003").exists()


def test_a_failed_background_save_raises_at_wait_and_commits_nothing(tmp_path):
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root)
    mgr.save(1, _writer(1))
    mgr.begin(2, clean=True)

    def failing():
        raise OSError("disk full")

    mgr.commit_when_written(2, failing, commit=True)
    with pytest.raises(OSError, match="disk full"):
        mgr.wait()
    assert find_latest_checkpoint(root).name == "step_0000001" and not (root / "step_0000002").exists()


def test_checkpoint_format_is_told_by_the_files(tmp_path):
    for fmt in FORMATS:
        CheckpointManager(tmp_path / fmt).save(1, _writer(1, fmt))
        assert checkpoint_format(tmp_path / fmt / "step_0000001") == fmt
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"expected state/.metadata \(sharded checkpoint\) or model.safetensors"):
        checkpoint_format(tmp_path / "empty")
