"""Recipe validation, LR schedules, batch ramp-up and --dry-run: fast, no process group."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kiln.config import ConfigError
from kiln.pretrain.recipe import TrainRecipe, load_recipe
from kiln.pretrain.schedule import LRSchedule

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "pretrain"
TINY = RECIPES / "tiny.yaml"


def tiny(*overrides: str) -> TrainRecipe:
    return load_recipe(TINY, list(overrides))


@pytest.mark.parametrize("name, world", [("tiny.yaml", 4), ("llama_1b.yaml", 8)])
def test_shipped_recipes_load(name, world):
    recipe = load_recipe(RECIPES / name)
    assert recipe.layout(world).dp == world


def test_layout_derives_dp_and_accepts_3d():
    assert str(tiny("parallel.tp=2", "parallel.pp=2").layout(8)) == "TP2 x PP2 x DP2"
    assert tiny("parallel.tp=2", "parallel.dp=2").layout(4).dp == 2


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by parallel.tp x parallel.pp = 2 x 2"),
        (["parallel.tp=2", "parallel.dp=2"], 8, "world size 8 != parallel.tp x parallel.pp x parallel.dp = 2 x 1 x 2"),
        (["parallel.tp=8"], 8, "tensor parallel size 8 does not divide num_attention_heads=4, num_key_value_heads=2"),
        (["parallel.tp=4"], 4, "num_key_value_heads=2"),
        (["parallel.tp=2", "model.vocab_size=129"], 2, "vocab_size=129"),
        (["parallel.pp=8"], 8, "model.num_hidden_layers (4) must be >= parallel.pp (8)"),
        (
            ["parallel.global_batch=12"],
            4,
            "parallel.global_batch (12) must be divisible by parallel.micro_batch x data-parallel size (2 x 4 = 8)",
        ),
        (
            [
                "parallel.global_batch=64",
                "batch_rampup.start=4",
                "batch_rampup.increment=12",
                "batch_rampup.ramp_samples=100",
            ],
            4,
            "batch_rampup.start (4) must be divisible",
        ),
    ],
)
def test_layout_errors_name_the_problem(overrides, world, message):
    recipe = tiny(*overrides)
    with pytest.raises(ConfigError) as e:
        recipe.layout(world)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.pp=2", "parallel.zero_stage=2"], "zero_stage=2 cannot be combined with pipeline parallelism"),
        (["parallel.pp=2", "parallel.zero_stage=3"], "zero_stage=3 cannot be combined with pipeline parallelism"),
        (["parallel.zero_stage=4"], "zero_stage must be 0, 1, 2 or 3"),
        (["parallel.micro_batch=0"], "key 'parallel': micro_batch must be >= 1"),
        (["parallel.dp=0"], "key 'parallel': dp must be >= 1 or -1"),
        (["optimizer.lr=0"], "key 'optimizer': lr must be > 0"),
        (["schedule.kind=linear"], "expected one of ['cosine', 'wsd', 'constant']"),
        (["schedule.warmup_steps=20"], "schedule.warmup_steps (20) must be < train_steps (20)"),
        (["batch_rampup.start=4"], "key 'batch_rampup': increment and ramp_samples must be >= 1"),
        (["batch_rampup.start=2", "batch_rampup.increment=4", "batch_rampup.ramp_samples=10"], "must be a multiple"),
        (["precision=fp16"], "expected one of ['fp32', 'bf16']"),
        (["parallel.tpp=2"], "Did you mean 'tp'?"),
        (
            ["data={datasets: [{prefix: x}]}"],
            "set exactly one of 'data' (indexed datasets, or an SFT recipe's builder section) or 'synthetic_data'",
        ),
    ],
)
def test_recipe_errors_before_any_process_group(overrides, message):
    with pytest.raises(ConfigError) as e:
        tiny(*overrides)
    assert message in str(e.value)


def test_cosine_schedule():
    s = LRSchedule(tiny("schedule.warmup_steps=10", "train_steps=110").schedule, 1.0, 110)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)


def test_wsd_schedule():
    cfg = tiny(
        "schedule.kind=wsd", "schedule.warmup_steps=10", "schedule.wsd_decay_fraction=0.2", "schedule.min_lr_ratio=0"
    )
    s = LRSchedule(cfg.schedule, 2.0, 100)
    assert s(4) == pytest.approx(1.0)
    assert [s(i) for i in (10, 50, 79)] == [2.0, 2.0, 2.0]
    assert s(80) == pytest.approx(2.0 * (1 - 1 / 20))
    assert s(89) == pytest.approx(1.0)
    assert s(99) == pytest.approx(0.0)


def test_batch_rampup_follows_megatron_rule():
    r = tiny(
        "parallel.global_batch=32", "batch_rampup.start=8", "batch_rampup.increment=8", "batch_rampup.ramp_samples=96"
    )
    # 3 increments over 96 samples: +8 every 32 consumed samples
    assert [r.global_batch_at(c) for c in (0, 31, 32, 64, 95, 96, 10_000)] == [8, 8, 16, 24, 24, 32, 32]
    steps = [r.global_batch_at(r.samples_before_step(k)) for k in range(9)]
    assert steps == [8, 8, 8, 8, 16, 16, 24, 24, 32]
    assert r.samples_before_step(9) == sum(steps)
    assert r.layout(4).dp == 4


def test_dry_run_prints_partition_and_memory(capsys):
    from kiln.cli import main

    rc = main(
        ["train", str(RECIPES / "llama_1b.yaml"), "--dry-run", "--world-size", "16", "parallel.tp=2", "parallel.pp=4"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "layout TP2 x PP4 x DP2 = 16 ranks" in out
    assert "embed_tokens, layers 0-3" in out and "layers 12-15, norm, lm_head (tied to embed_tokens)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    # stage 1 holds 4 decoder layers' TP halves: 4 * (4 * 2048^2 * ... ) / 2, as counted from the shapes
    h, kv, inter = 2048, 8 * 64, 8192
    layer = 2 * h + h * h + 2 * h * kv + h * h + 3 * h * inter
    sharded = layer - 2 * h
    assert float(rows[1][1].rstrip("M")) == pytest.approx(4 * (sharded / 2 + 2 * h) / 1e6, abs=0.01)


def test_dry_run_rejects_bad_world_size(capsys):
    from kiln.cli import main

    assert main(["train", str(TINY), "--dry-run", "--world-size", "6", "parallel.pp=4"]) == 2
    assert "world size 6 is not divisible by parallel.tp x parallel.pp = 1 x 4" in capsys.readouterr().err


def test_missing_data_fails_before_any_process_group(tmp_path):
    import torch.distributed as dist

    from kiln.pretrain.data import DataError
    from kiln.pretrain.train import train

    recipe = tiny("synthetic_data=null", f"data={{datasets: [{{prefix: {tmp_path}/nope}}], seq_length: 32}}")
    with pytest.raises(DataError):
        train(recipe)
    assert not dist.is_initialized()
