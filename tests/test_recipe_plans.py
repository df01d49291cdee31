"""Every training recipe plans at its intended scale (issue 12): each YAML in recipes/pretrain and recipes/sft carries
one header line ``#   kiln train recipes/<kind>/<name>.yaml --dry-run --world-size N``, which is run here as written
from an empty directory (so neither the data nor the starting weights can be read), and every pipeline stage's
memory plan per GPU must be under the device's memory: 80 GiB, or what a ``# device memory: N GiB`` line names.

Also the published numbers the real-scale headers quote, recomputed from the recipes (MT-NLG's token points through
the batch ramp, MeCo's cooldown step)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes" / "pretrain").glob("*.yaml")) + sorted((REPO / "recipes" / "sft").glob("*.yaml"))
DEFAULT_DEVICE_GIB = 80.0
DRY_RUN_LINE = re.compile(r"^#\s+kiln train (?P<path>\S+) --dry-run --world-size (?P<world>\d+)(?:\s+#.*)?$")
DEVICE_LINE = re.compile(r"^# device memory: (?P<gib>\d+(?:\.\d+)?) GiB\b")
# a stage row of the dry-run table: stage, params/rank, weights, grads, optimizer, activations, total, layers
STAGE_ROW = re.compile(r"^\s*(?P<stage>\d+)\s+[\d.]+M(?:\s+[\d.]+Gi){4}\s+(?P<total>[\d.]+)Gi\s")


def intended_plan(path: Path) -> tuple[int, float]:
    """(world size, device GiB) that the recipe's header states."""
    lines = path.read_text(encoding="utf-8").splitlines()
    runs = [m for m in map(DRY_RUN_LINE.match, lines) if m]
    assert len(runs) == 1, (
        f"{path.name}: expected one '#   kiln train {path.relative_to(REPO)} --dry-run --world-size N' header line, "
        f"found {len(runs)}"
    )
    assert runs[0]["path"] == path.relative_to(REPO).as_posix(), f"{path.name}: the dry-run line names another file"
    devices = [float(m["gib"]) for m in map(DEVICE_LINE.match, lines) if m]
    assert len(devices) <= 1, f"{path.name}: more than one '# device memory:' line"
    return int(runs[0]["world"]), devices[0] if devices else DEFAULT_DEVICE_GIB


def test_every_training_recipe_is_covered():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    real_scale = {
        "pretrain/mtnlg_530b.yaml", "pretrain/llama_1b.yaml", "pretrain/llama_8b.yaml", "pretrain/llama_70b.yaml",
        "pretrain/meco_1_6b.yaml", "sft/agentlm-7b-hybrid.yaml", "sft/agentlm-13b-hybrid.yaml",
        "sft/agentlm-70b-hybrid.yaml",
    }  # fmt: skip
    assert real_scale <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_dry_run_fits_the_device_at_its_world_size(path, tmp_path, monkeypatch, capsys):
    from kiln.cli import main
    from kiln.pretrain.recipe import load_recipe

    world, device_gib = intended_plan(path)
    layout = load_recipe(path).layout(world)
    monkeypatch.chdir(tmp_path)  # the recipes' relative data and weight paths resolve to nothing here
    assert main(["train", str(path), "--dry-run", "--world-size", str(world)]) == 0
    out = capsys.readouterr().out
    assert f"layout {layout} = {world} ranks" in out
    totals = {int(m["stage"]): float(m["total"]) for m in map(STAGE_ROW.match, out.splitlines()) if m}
    assert sorted(totals) == list(range(layout.pp)), out
    over = {stage: gib for stage, gib in totals.items() if gib >= device_gib}
    assert not over, f"{path.name}: stages over {device_gib} GiB per GPU: {over}\n{out}"


def _step_reaching(recipe, tokens: float) -> int:
    """The first optimizer step whose start has consumed at least ``tokens`` tokens."""
    lo, hi = 0, recipe.train_steps * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if recipe.samples_before_step(mid) * recipe.seq_length >= tokens:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_mtnlg_recipe_is_the_published_setup():
    from kiln.pretrain.recipe import load_recipe

    r = load_recipe(REPO / "recipes" / "pretrain" / "mtnlg_530b.yaml")
    assert str(r.layout(2240)) == "TP8 x PP35 x DP8" and r.parallel.zero_stage == 1 and r.seq_length == 2048
    m = r.model
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads) == (105, 20480, 128)
    assert (r.batch_rampup.start, r.batch_rampup.increment, r.parallel.global_batch) == (32, 32, 1920)
    assert r.global_batch_at(0) == 32
    o, s = r.optimizer, r.schedule
    assert (o.lr, tuple(o.betas), o.weight_decay, o.clip_grad, s.kind, s.min_lr_ratio) == (
        5e-5, (0.9, 0.95), 0.1, 1.0, "cosine", 0.1
    )  # fmt: skip
    # the token points of the paper, as optimizer steps through the ramp (what the header quotes)
    assert _step_reaching(r, 1e9) == s.warmup_steps == 7036
    assert _step_reaching(r, 12e9) == 14475 and r.global_batch_at(r.samples_before_step(14475)) == 1920
    assert _step_reaching(r, 270e9) == r.train_steps == 80087
    assert _step_reaching(r, 340e9) == s.decay_steps == 97889


def test_meco_recipe_cools_down_for_the_last_tenth():
    from kiln.pretrain.data import cooldown_step
    from kiln.pretrain.recipe import load_recipe

    r = load_recipe(REPO / "recipes" / "pretrain" / "meco_1_6b.yaml")
    assert r.data.meco.enabled and cooldown_step(r.train_steps, r.data.meco.cooldown_fraction) == 36000
    assert r.parallel.global_batch * r.seq_length == 4 * 1024**2  # 4M tokens per step, 40,000 steps: ~168B tokens
    assert (r.optimizer.lr, r.optimizer.weight_decay, r.schedule.warmup_steps) == (3e-3, 0.033, 2000)
