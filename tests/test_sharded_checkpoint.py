"""Sharded checkpoints across ranks (2 gloo ranks on CPU, the tiny recipe):

* at DP2 (ZeRO 1) and at TP2 each rank wrote its own shard file, none of them the whole state, and together they
  cover every tensor exactly once (read from DCP's metadata: which file holds which chunk);
* ``kiln export-hf`` on the TP2 checkpoint, in a fresh process with no process group, writes an HF model whose
  weights are bitwise the trained model's and whose logits equal those of the same step's full-format export;
* ``checkpoint.async_save``: saves at steps 2 and 4 are written in the background (the next save finds them
  pending and commits them first), the last one synchronously; resuming the step-4 one is bitwise;
* a checkpoint in the older full format (``model.safetensors`` + ``optimizer.pt``) resumes bitwise at its layout
  (DP2 ZeRO 2) and within 1e-4 at ZeRO 3, and the resumed run's next checkpoint is sharded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "pretrain" / "tiny.yaml")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _runs(rank: int, world_size: int, runs: list[tuple[str, list[str], dict]]) -> dict:
    """In each spawned rank, train every run in turn. Per run: the steps' (step, loss, grad norm), the waits for a
    background save the saves made (was one pending, which one), and with ``weights`` the full model at the end
    (rank 0). Options: ``full_format`` saves in the older format; ``full_copy`` also writes the final state in the
    full format under that root."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import kiln.pretrain.checkpointing as checkpointing
    import kiln.pretrain.train as train_module
    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.callbacks.base import Callback
    from kiln.pretrain.checkpoint import CheckpointManager
    from kiln.pretrain.engine import TrainEngine
    from kiln.pretrain.recipe import load_recipe

    class Record(Callback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, state, metrics):
            self.steps.append((state.step, float(metrics["loss"]), float(metrics["grad_norm"])))

    waits: list[tuple[bool, str | None]] = []
    original_wait = checkpointing.wait_for_checkpoint

    def recording_wait(manager, ctx):
        pending = manager.pending
        final = original_wait(manager, ctx)
        waits.append((pending, final.name if final is not None else None))
        return final

    out = {}
    for name, overrides, options in runs:
        recipe = load_recipe(TINY, ["train_steps=6", "log_interval=1000", "checkpoint.keep_last=10", *overrides])
        ctx = init_parallel(recipe.layout(world_size), timeout_s=120)
        engine = TrainEngine(recipe, ctx)
        record = Record()
        waits.clear()
        checkpointing.wait_for_checkpoint = recording_wait
        save = checkpointing.save_train_checkpoint  # TrainEngine.save_checkpoint looks it up at each save
        if options.get("full_format"):
            checkpointing.save_train_checkpoint = checkpointing.save_full_train_checkpoint
        try:
            state = train_module.train(recipe, [record], ctx=ctx, loggers=False, engine=engine)
        finally:
            checkpointing.wait_for_checkpoint = original_wait
            checkpointing.save_train_checkpoint = save
        result = {"steps": record.steps, "waits": list(waits)}
        if options.get("full_copy"):
            checkpointing.save_full_train_checkpoint(
                CheckpointManager(options["full_copy"]), recipe, engine, state, ctx
            )
        if options.get("weights"):
            weights = engine.full_model_state()
            result["weights"] = weights if rank == 0 else None
        out[name] = result
        del engine
        destroy_parallel()
    return out


# ------------------------------------------------------------------------------------------------ who wrote what


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory) -> tuple[Path, dict]:
    """A DP2 ZeRO-1 and a TP2 run of 2 steps, each saving at step 2 (TP2: also a full-format copy)."""
    from kiln.pretrain.testing import run_distributed

    root = tmp_path_factory.mktemp("sharded")
    common = ["train_steps=2", "schedule.warmup_steps=1", "checkpoint.interval=2"]
    runs = [
        ("DP2", [*common, "parallel.zero_stage=1", f"run_dir={root}/dp2"], {}),
        ("TP2", [*common, "parallel.tp=2", f"run_dir={root}/tp2"], {"weights": True, "full_copy": str(root / "full")}),
    ]
    return root, run_distributed(_runs, 2, runs)[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["DP2", "TP2"])
def test_each_rank_writes_only_its_own_shards(two_layouts, layout):
    from kiln.pretrain import sharded_io
    from kiln.pretrain.checkpoint import MODEL_FILE, OPTIMIZER_FILE, is_complete

    root, _ = two_layouts
    ckpt = root / layout.lower() / "checkpoints" / "step_0000002"
    assert is_complete(ckpt) and not (ckpt / MODEL_FILE).exists() and not (ckpt / OPTIMIZER_FILE).exists()
    state = ckpt / "state"
    metadata = sharded_io.read_metadata(state)
    tensors = {k: md for k, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}
    full_bytes = sum(math.prod(md.size) * md.properties.dtype.itemsize for md in tensors.values())
    files = sharded_io.chunks_by_file(state)
    assert sorted(files) == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank, each rank wrote its own
    for name, chunks in files.items():
        size = (state / name).stat().st_size
        # far from the whole state: about half of it (+ torch.save framing per chunk)
        assert 0.3 * full_bytes < size < 0.65 * full_bytes, (layout, name, size, full_bytes)
        assert any(fqn.startswith("optimizer.exp_avg.") for fqn, _, _ in chunks)  # each its own AdamW part
    # together: every tensor exactly once (chunk volumes add up to the full size; DCP wrote no duplicate)
    volume: dict[str, int] = {}
    for chunks in files.values():
        for fqn, _, size in chunks:
            volume[fqn] = volume.get(fqn, 0) + math.prod(size)
    assert volume == {k: math.prod(md.size) for k, md in tensors.items()}
    names = {k.split(".", 1)[1] for k in tensors if k.startswith("model.")}
    for kind in ("optimizer.fp32.", "optimizer.exp_avg.", "optimizer.exp_avg_sq."):
        assert {k[len(kind) :] for k in tensors if k.startswith(kind)} == names
    assert len(names) == 38 and "optimizer.step" in metadata.state_dict_metadata  # tiny: 4 layers x 9, embed, norm
    q = "model.layers.0.self_attn.q_proj.weight"
    by_file = {f: [(o, s) for fqn, o, s in chunks if fqn == q] for f, chunks in files.items()}
    if layout == "TP2":  # the column-parallel weight: each TP rank wrote its half of the rows
        rows = tensors[q].size[0]
        assert by_file == {
            "__0_0.distcp": [((0, 0), (rows // 2, 64))],
            "__1_0.distcp": [((rows // 2, 0), (rows // 2, 64))],
        }
    else:  # replicated over DP at ZeRO 1: written once, by one of the ranks
        assert sorted(len(v) for v in by_file.values()) == [0, 1]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "sharded" and meta["layout"]["world_size"] == 2


@pytest.mark.slow
def test_export_hf_reads_a_sharded_checkpoint_in_one_process(two_layouts, tmp_path):
    from transformers import AutoModelForCausalLM

    root, results = two_layouts
    sharded = root / "tp2" / "checkpoints" / "step_0000002"
    full = root / "full" / "step_0000002"
    assert (full / "model.safetensors").is_file() and not (full / "state").exists()
    models = {}
    for name, ckpt in (("sharded", sharded), ("full", full)):
        out = tmp_path / name
        env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        cmd = [sys.executable, "-m", "kiln", "export-hf", str(ckpt), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"exported {ckpt} -> {out}" in proc.stdout
        models[name] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained = results["TP2"]["weights"]
    hf_state = models["sharded"].state_dict()
    for name, weight in trained.items():  # bitwise the trained model's weights
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        assert torch.equal(hf_state[hf_name], weight), name
    tokens = torch.randint(0, models["full"].config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: m(tokens).logits for name, m in models.items()}
    assert logits["sharded"].shape == (2, 24, models["full"].config.vocab_size)
    assert torch.equal(logits["sharded"], logits["full"])


@pytest.mark.slow
def test_a_model_that_does_not_fit_the_checkpoint_names_the_tensor(two_layouts):
    from kiln.pretrain.checkpoint_model import load_checkpoint_model

    root, _ = two_layouts
    ckpt = root / "dp2" / "checkpoints" / "step_0000002"
    model, cfg = load_checkpoint_model(ckpt)  # one process, no process group
    assert cfg.hidden_size == 64 and sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(ValueError, match=r"tensor 'layers.0.mlp.gate_proj.weight' has shape \[\d+, 64\] but the"):
        load_checkpoint_model(ckpt, intermediate_size=96)


# ------------------------------------------------------------------------------------------------ async, old format


@pytest.mark.slow
def test_async_save_and_a_full_format_checkpoint_resume(tmp_path):
    from kiln.pretrain.checkpoint import LATEST, MODEL_FILE, OPTIMIZER_FILE, checkpoint_format, is_complete
    from kiln.pretrain.testing import run_distributed

    a, f = tmp_path / "async", tmp_path / "full"
    base = ["parallel.zero_stage=2"]
    runs = [
        ("async", [*base, "checkpoint.interval=2", "checkpoint.async_save=true", f"run_dir={a}"], {}),
        ("async resumed", [*base, f"resume={a}/checkpoints/step_0000004", f"run_dir={tmp_path}/ar"], {}),
        ("full", [*base, "checkpoint.interval=3", f"run_dir={f}"], {"full_format": True}),
        (
            "full resumed",
            [*base, "checkpoint.interval=3", f"resume={f}/checkpoints/step_0000003", f"run_dir={tmp_path}/fr"],
            {},
        ),
        (
            "full resumed at ZeRO 3",
            ["parallel.zero_stage=3", f"resume={f}/checkpoints/step_0000003", f"run_dir={tmp_path}/fz"],
            {},
        ),
    ]
    results = run_distributed(_runs, 2, runs)
    for r in results[1:]:
        assert {k: v["steps"] for k, v in r.items()} == {k: v["steps"] for k, v in results[0].items()}
    got = results[0]
    assert [s[0] for s in got["async"]["steps"]] == [1, 2, 3, 4, 5, 6]
    # save 2 and 4 were still pending when the next save came and were committed first; save 6 was synchronous,
    # so the trainer's wait at the end (the Checkpointer's on_train_end) finds nothing pending
    assert got["async"]["waits"] == [(False, None), (True, "step_0000002"), (True, "step_0000004"), (False, None)]
    ckpts = a / "checkpoints"
    assert all(is_complete(ckpts / f"step_{s:07d}") for s in (2, 4, 6))
    assert (ckpts / LATEST).read_text().strip() == "step_0000006" and not list(ckpts.glob("*.tmp"))
    assert got["async resumed"]["steps"] == got["async"]["steps"][4:]  # bitwise: the copy was of step 4

    old = f / "checkpoints" / "step_0000003"
    assert checkpoint_format(old) == "full" and (old / MODEL_FILE).is_file() and (old / OPTIMIZER_FILE).is_file()
    assert got["full resumed"]["steps"] == got["full"]["steps"][3:]  # bitwise
    assert checkpoint_format(tmp_path / "fr" / "checkpoints" / "step_0000006") == "sharded"
    other = got["full resumed at ZeRO 3"]["steps"]  # the full format at another ZeRO stage: the usual tolerance
    assert [s[0] for s in other] == [4, 5, 6]
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(other, got["full"]["steps"][3:]):
        assert loss == pytest.approx(ref_loss, rel=1e-4) and norm == pytest.approx(ref_norm, rel=1e-3), step


def test_async_save_is_for_periodic_saves():
    from kiln.config import ConfigError
    from kiln.pretrain.recipe import load_recipe

    with pytest.raises(ConfigError, match="key 'checkpoint': async_save applies to periodic saves, and interval is 0"):
        load_recipe(TINY, ["checkpoint.async_save=true"])
    assert load_recipe(TINY, ["checkpoint.async_save=true", "checkpoint.interval=5"]).checkpoint.async_save
    assert load_recipe(TINY).checkpoint.async_save is False
