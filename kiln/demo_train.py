"""The demo's training stages: pretraining on 4 gloo ranks and its loss curve.

Each stage runs kiln's own command as a user would (`torchrun ... -m kiln train pretrain/demo key=value ...`),
with its output in <output>/logs/<stage>.log, and reads its key figure from what the command wrote
(``metrics.jsonl``). The shipped recipe holds the model and the schedule; the demo overrides only the paths of its
run directory and the sizes of its scale (--quick).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.demo import Demo, StageResult

PRETRAIN_RECIPE = "pretrain/demo"
RANKS = 4  # TP2 x PP2 (the recipe's parallel section): two of the three dimensions above 1 on 4 processes
# The demo's model is CPU-sized and its layout is 4 gloo ranks whatever the machine: a GPU would be shared by
# the 4 ranks (NCCL refuses that) and DeepSpeed would pick its CUDA accelerator.
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def pretrain_overrides(demo: Demo) -> list[str]:
    s = demo.scale
    return [
        f"data.datasets.0.prefix={demo.tokens_prefix()}",
        f"data.tokenizer={demo.out / 'tokenizer'}",
        f"model.vocab_size={demo.args.vocab_size}",
        f"run_dir={demo.out / 'pretrain'}",
        f"train_steps={s.pretrain_steps}",
        f"eval.interval={s.pretrain_eval_interval}",
        f"checkpoint.interval={s.pretrain_checkpoint_interval}",
        f"log_interval={s.pretrain_log_interval}",
        "resume=true",  # a demo killed mid-run continues from the last checkpoint
    ]


def pretrain(demo: Demo) -> StageResult:
    from kiln.pretrain.data import cooldown_step
    from kiln.pretrain.recipe import load_recipe

    run_dir = demo.out / "pretrain"
    done = demo.finished("pretrain", run_dir)
    if done is not None:
        return done
    overrides = pretrain_overrides(demo)
    recipe = load_recipe(str(_recipe_path(PRETRAIN_RECIPE)), overrides)
    layout = recipe.layout(RANKS)  # a bad layout fails here, before 4 processes start
    switch = cooldown_step(recipe.train_steps, recipe.data.meco.cooldown_fraction)
    print(
        f"  torchrun --standalone --nproc-per-node {RANKS} -m kiln train {PRETRAIN_RECIPE}: {layout}, "
        f"{recipe.train_steps} steps (log {demo.log('pretrain')})",
        flush=True,
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS)]
    demo.execute("pretrain", [*cmd, "-m", "kiln", "train", PRETRAIN_RECIPE, *overrides], env=CPU_ENV)
    train, evals = metrics_or_error(run_dir)
    evals = [r for r in evals if "val_loss" in r]
    val = f" (held-out {evals[-1]['val_loss']:.2f})" if evals else ""
    figure = (
        f"loss {train[0]['loss']:.2f} -> {train[-1]['loss']:.2f}{val}, TP{layout.tp}xPP{layout.pp}, "
        f"MeCo 1-{switch} + plain {switch + 1}-{recipe.train_steps}"
    )
    return demo.finish("pretrain", run_dir, figure)


def curve(demo: Demo) -> StageResult:
    from kiln.config import ConfigError
    from kiln.demo import StageResult
    from kiln.pretrain.plot import plot_run

    run_dir = demo.out / "pretrain"
    png = plot_run(run_dir, run_dir / "loss_curve.png")
    evals = [r for r in metrics_or_error(run_dir)[1] if "val_loss" in r]
    if not evals:
        raise ConfigError(f"{run_dir}/metrics.jsonl holds no held-out loss: the recipe's eval.interval is 0")
    figure = f"held-out loss {evals[0]['val_loss']:.2f} -> {evals[-1]['val_loss']:.2f} ({len(evals)} evaluations)"
    return StageResult("curve", png, figure)


def _recipe_path(name: str):
    from kiln.catalog import find_recipe

    return find_recipe(name).path


def metrics_or_error(run_dir) -> tuple[list[dict], list[dict]]:
    """The run's (training records, evaluation records), or an error when it recorded no training step. Every
    evaluation record is kept: an SFT run writes one per held-out split at the same step (agent, general)."""
    import json

    from kiln.config import ConfigError
    from kiln.pretrain.callbacks.metrics_file import METRICS_FILE, read_metrics

    train = read_metrics(run_dir)["train"]
    if not train:
        raise ConfigError(f"{run_dir}/metrics.jsonl holds no training records: see {run_dir}/logs/ for what happened")
    evals = []
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash (a resumed run goes on after it)
        if record.get("kind") == "eval":
            evals.append(record)
    return train, evals
