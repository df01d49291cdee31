"""The demo's instruction-tuning stages: the hybrid mix's two halves, its build, and SFT from the pretrained model.

agent_data    `kiln agent gen`: TextWorld games generated offline (into the run directory's game cache) and
              the expert's ReAct trajectory of each, as AgentInstruct-style records
general_data  instruction / answer pairs made from the curated documents (kiln.demo_general says how)
sft_data      `kiln data sft sft/demo`: both halves rendered with ChatML in the demo's tokenizer, mixed at the
              recipe's eta, labelled (assistant turns only) and packed
sft           `kiln train sft/demo`: from the demo's last pretraining checkpoint (init_from)
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from kiln.config import ConfigError
from kiln.demo_train import CPU_ENV, metrics_or_error

if TYPE_CHECKING:
    from kiln.demo import Demo, StageResult

SFT_RECIPE = "sft/demo"
# Data parallel over the 2 cores the demo is sized for: two one-thread ranks (torchrun sets OMP_NUM_THREADS=1)
# rather than one process whose second OpenMP thread spins whenever the machine is busy.
SFT_RANKS = 2


def trajectories(demo: Demo):
    return demo.out / "agent" / "train" / "trajectories.jsonl"


def game_cache(demo: Demo):
    return demo.out / "agent" / "games"  # not ~/.cache: a fresh machine's run directory holds everything it used


def agent_data(demo: Demo) -> StageResult:
    out = trajectories(demo)
    done = demo.finished("agent_data", out.parent)
    if done is not None:
        return done
    s = demo.scale
    print(f"  kiln agent gen --kinds {s.agent_kinds} --seeds {s.agent_seeds} (log {demo.log('agent_data')})")
    cmd = [sys.executable, "-m", "kiln", "agent", "gen", "--kinds", s.agent_kinds, "--seeds", s.agent_seeds]
    demo.execute("agent_data", [*cmd, "--cache", str(game_cache(demo)), "--out", str(out)])
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    steps = sum(json.loads(line)["meta"]["steps"] for line in out.open())
    lost = f", {len(manifest['not_won'])} not won (left out)" if manifest["not_won"] else ""
    figure = f"{manifest['records']} expert trajectories ({steps} actions) from {len(manifest['games'])} games{lost}"
    return demo.finish("agent_data", out.parent, figure)


def general_data(demo: Demo) -> StageResult:
    from kiln.demo_general import build_general_data

    out = demo.out / "general" / "instructions.jsonl"
    done = demo.finished("general_data", out.parent)
    if done is not None:
        return done
    counts = build_general_data(demo.out / "data" / "output", out)
    total = counts.get("continue", 0) + counts.get("source", 0)
    if total == 0:
        raise ConfigError(f"no instruction could be made from the {counts.get('documents', 0)} curated documents")
    figure = (
        f"{total:,} instructions ({counts.get('continue', 0):,} continue, {counts.get('source', 0):,} website) "
        f"from {counts['documents']:,} docs"
    )
    return demo.finish("general_data", out.parent, figure)


def sft_data_overrides(demo: Demo) -> list[str]:
    return [
        f"data.tokenizer={demo.out / 'tokenizer'}",
        f"data.output_dir={demo.out / 'sft_data'}",
        f"data.sources.0.paths=[{json.dumps(str(trajectories(demo)))}]",
        f"data.sources.1.paths=[{json.dumps(str(demo.out / 'general' / 'instructions.jsonl'))}]",
    ]


def sft_data(demo: Demo) -> StageResult:
    out = demo.out / "sft_data"
    done = demo.finished("sft_data", out)
    if done is not None:
        return done
    if out.exists():  # a build cut short: `kiln data sft` writes into the folder, so start it clean
        import shutil

        shutil.rmtree(out)
    print(f"  kiln data sft {SFT_RECIPE} (log {demo.log('sft_data')})")
    demo.execute("sft_data", [sys.executable, "-m", "kiln", "data", "sft", SFT_RECIPE, *sft_data_overrides(demo)])
    report = json.loads((out / "report.json").read_text())
    mix, pack = report["mix"], report["packing"]
    figure = (
        f"{mix['examples']:,} examples (agent {report['agent_share']:.2f}), {mix['tokens']:,} tokens, "
        f"{pack['packs']} sequences"
    )
    return demo.finish("sft_data", out, figure)


def sft(demo: Demo) -> StageResult:
    run_dir = demo.out / "sft"
    done = demo.finished("sft", run_dir)
    if done is not None:
        return done
    start = demo.last_checkpoint("pretrain")
    s = demo.scale
    overrides = [
        *sft_data_overrides(demo),
        f"init_from={start}",
        f"model.vocab_size={demo.args.vocab_size}",
        f"run_dir={run_dir}",
        f"train_steps={s.sft_steps}",
        f"eval.interval={s.sft_eval_interval}",
        f"checkpoint.interval={s.sft_checkpoint_interval}",
        f"log_interval={s.sft_log_interval}",
    ]
    print(
        f"  torchrun --standalone --nproc-per-node {SFT_RANKS} -m kiln train {SFT_RECIPE} from {demo.shown(start)}: "
        f"DP{SFT_RANKS}, {s.sft_steps} steps (log {demo.log('sft')})",
        flush=True,
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(SFT_RANKS)]
    demo.execute("sft", [*cmd, "-m", "kiln", "train", SFT_RECIPE, *overrides], env=CPU_ENV)
    train, evals = metrics_or_error(run_dir)
    # one evaluation record per held-out split and step: the last value of each role's loss
    last = {key: r[key] for r in evals for key in ("val_agent_loss", "val_general_loss") if key in r}
    held = ", ".join(f"{key.split('_')[1]} {value:.2f}" for key, value in last.items())
    figure = f"loss {train[0]['loss']:.2f} -> {train[-1]['loss']:.2f}" + (f"; held-out {held}" if held else "")
    return demo.finish("sft", run_dir, figure)
