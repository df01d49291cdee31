"""AgentTuning's ablation at CPU scale: hybrid vs agent-only vs general-only SFT of SmolLM2-135M-Instruct (issue 10).

What runs (from the repository root; everything under ``--root``, default ``runs/ablation/``, git-ignored):

1. ``kiln agent gen``: expert TextWorld trajectories of the held-in game kinds (``--tw-kinds``, default
   tiny,small,medium) and training seeds (``--tw-seeds``, default 0-59), an agent source of every arm beside
   the shared agent sources of ``recipes/sft/*_cpu.yaml`` (weight ``--tw-weight`` inside the agent role), so
   TextWorld skill can move. Its manifest keeps the evaluation games unseen (``kiln agent eval --exclude``).
2. Three arms, each ``kiln train`` from ``init_from: smollm2`` with the CPU recipes' optimiser (AdamW 0.9/0.95,
   lr 5e-5 cosine, clip 1, weight decay 0.1, loss on assistant tokens, global-token normalisation):
   ``hybrid`` (eta 0.2, hybrid_cpu.yaml), ``agent_only`` (eta 1.0, agent_only_cpu.yaml) and ``general_only``
   (eta 0.0, general_only_cpu.yaml). Every arm lists ALL sources (the arm's eta gives the other role a target
   share of 0, so it trains on none of it), so every arm has the same held-out split of both roles. Equal token
   budget: each arm's mix stops at ``steps x global_batch x (seq_length + 1)`` tokens and training reads
   ``steps x global_batch`` packed sequences of ``seq_length`` positions: the same number of positions for
   every arm (how many of them carry loss differs by arm and is reported).
3. ``--seeds`` (default 0,1): the seed is the SFT data seed (``data.seed``). It changes, for every source, which
   rows are held out (drawn from (seed, source name)), which training examples the mix samples and in which
   order, the packing order, and the trainer's epoch permutation of the packed sequences. The weights do not
   depend on it (every arm starts from the same SmolLM2 weights, and the model has no dropout). The three arms
   of one seed share the held-out rows exactly; different seeds are different random splits.
4. ``kiln export-hf`` of each arm's last checkpoint, then ``kiln agent eval`` of it and of the untrained
   SmolLM2 (the baseline row) on the same unseen games.

Metrics (fixed before any arm was run):

- held-out agent loss: ``val_agent_loss`` after the last step, the token-weighted mean loss on the assistant
  tokens of every held-out packed sequence of the agent sources (TextWorld included), at the run's seq_length;
- held-out general loss: ``val_general_loss``, the same on the general sources' held-out rows;
- the baseline's held-out losses are the same evaluation at step 0 (``eval.at_start`` of each seed's first arm);
- games (``kiln agent eval``, greedy decoding, the training prompt format): ``--games-per-kind`` unseen games of
  the held-in kind ``small`` (seeds from ``--eval-seed``, never training seeds: the gen manifest is passed as
  ``--exclude``) and as many of the held-out kind ``small-brief`` (brief goals, never trained on), each played
  for at most ``--max-steps`` steps: success rate (overall and per kind), invalid-action rate (reply without an
  ``Action:`` line, or a command not among the admissible ones, over all steps), repeated-action rate (the
  previous step's command again), mean score;
- each arm's number is the mean over seeds, with the per-seed values beside it.

The AgentTuning direction is read off the seed means, and printed as measured, never assumed: (a) the hybrid's
general loss rises less from the baseline than agent-only's; (b) the hybrid's agent loss is below the baseline's
and general-only's; (c) the hybrid's success rate is at least the baseline's and its invalid-action rate at most
the baseline's. A comparison between two trained arms counts as resolved only when every seed of one arm is on
the same side of every seed of the other (with two seeds and a handful of games most differences are not).

Usage (``--threads 1``: on a loaded machine one intra-op thread per process ran generation ~10x faster than
two; the games of a finished arm run in a background process while the next arm trains, and
``--parallel-arms N`` trains N arms at once):

    nice -n 5 python -m benchmarks.sft_ablation --parallel-arms 3
    nice -n 5 python -m benchmarks.sft_ablation --seeds 0 --steps 2 --heldout-max 4 --games-per-kind 1 \
        --max-steps 2 --no-record   # smoke test: everything under runs/ablation/

The defaults (6 steps of 4 x 512 tokens, 8 held-out conversations per source, 2 + 2 games of at most 5 steps)
are sized to a 2-core machine shared with other jobs: one arm costs a few CPU-minutes (process start, data
build, held-out evaluation, and about 17 s per step on one free core), a game step 2-8 s. On a quiet machine, larger settings such as
``--steps 12 --heldout-max 16 --games-per-kind 4 --max-steps 8`` give a less noisy reading.

Finished runs, exports and game reports are reused when the script is run again with the same sizes (their
folder names carry the sizes), so a crash loses only the step in flight. Results are appended to
benchmarks/results/sft_ablation.md and the plot written to benchmarks/results/sft_ablation.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from benchmarks.record import append_result

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sft_ablation.md"
PLOT = REPO / "benchmarks" / "results" / "sft_ablation.png"
# The arm -> the shipped CPU recipe whose eta it uses (read from the file, not restated here).
ARM_RECIPES = {
    "hybrid": "recipes/sft/hybrid_cpu.yaml",
    "agent_only": "recipes/sft/agent_only_cpu.yaml",
    "general_only": "recipes/sft/general_only_cpu.yaml",
}
HELD_IN_KIND, HELD_OUT_KIND = "small", "small-brief"
GAME_METRICS = ("success_rate", "invalid_action_rate", "repeated_action_rate", "mean_score")
_print_lock = threading.Lock()


def _say(msg: str) -> None:
    with _print_lock:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def _kiln(args: list[str], log: Path, threads: int) -> tuple[int, float]:
    """``kiln ARGS``, its output in ``log``: (exit code, seconds). One intra-op thread by default (see the
    docstring); DeepSpeed on the CPU accelerator. The subprocess inherits this process's niceness (run the
    benchmark under ``nice``): niced again here, it starved behind the other jobs of a shared machine."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ kiln " + shlex.join(args) + "\n")
        f.flush()
        rc = subprocess.run(
            [sys.executable, "-m", "kiln", *args],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        ).returncode
    return rc, time.perf_counter() - start


def _tail(log: Path, n: int = 5) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    return " / ".join(lines[-n:])[-600:]


# ------------------------------------------------------------------------------------------------- data


def textworld_source(args, root: Path) -> Path:
    """The expert trajectories of the held-in kinds and training seeds; reused when the manifest matches."""
    from kiln.agent.games import parse_seeds

    out = root / "agent" / "textworld_train.jsonl"
    manifest = Path(f"{out}.manifest.json")
    want_kinds = [k.strip() for k in args.tw_kinds.split(",") if k.strip()]
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if [k["name"] for k in m["kinds"]] == want_kinds and m["seeds"] == parse_seeds(args.tw_seeds):
            _say(f"textworld: reusing {out} ({m['records']} trajectories)")
            return out
    cmd = ["agent", "gen", "--kinds", args.tw_kinds, "--seeds", args.tw_seeds, "--out", str(out), "-q"]
    rc, secs = _kiln(cmd, root / "agent" / "gen.log", args.threads)
    if rc != 0:
        raise SystemExit(f"kiln agent gen failed ({rc}): {_tail(root / 'agent' / 'gen.log')}")
    m = json.loads(manifest.read_text())
    _say(f"textworld: {m['records']} expert trajectories in {secs:.0f} s (not won: {len(m['not_won'])})")
    return out


def base_recipe() -> tuple[dict, dict[str, float]]:
    """hybrid_cpu.yaml (optimiser, model, sources) and each arm's eta from its own recipe. The agent-only and
    general-only recipes' sources must be the hybrid's of their role, so one source list serves all arms."""
    base = yaml.safe_load((REPO / ARM_RECIPES["hybrid"]).read_text())
    names = {s["name"]: s for s in base["data"]["sources"]}
    etas = {}
    for arm, path in ARM_RECIPES.items():
        r = yaml.safe_load((REPO / path).read_text())
        etas[arm] = float(r["data"]["mix"]["eta"])
        for s in r["data"]["sources"]:
            if names.get(s["name"]) != s:
                raise SystemExit(f"{path}: source {s['name']} differs from {ARM_RECIPES['hybrid']}'s")
    return base, etas


def arm_recipe(base: dict, arm: str, eta: float, seed: int, args, run_dir: Path, sources: list[dict]) -> dict:
    r = copy.deepcopy(base)
    d = r["data"]
    r["name"] = f"ablation-{arm}-s{seed}"
    d["seq_length"] = args.seq_length
    d["output_dir"] = str(run_dir.relative_to(REPO) / "data")
    d["heldout_max"] = args.heldout_max
    d["seed"] = seed
    d["mix"]["eta"] = eta
    # the equal budget: the tokens the run reads, so the mix is used about once and every arm reads as much
    d["mix"]["total_tokens"] = args.steps * args.global_batch * (args.seq_length + 1)
    d["sources"] = sources
    r["parallel"]["global_batch"] = args.global_batch
    r["train_steps"] = args.steps
    r["log_interval"] = 1
    # every held-out sequence (batches is a cap, not a sample); the step-0 evaluation only in a seed's first
    # arm: it is the same untrained model on the same held-out rows for the three arms of a seed
    r["eval"] = {"interval": args.steps, "batches": 100000, "batch_size": args.global_batch,
                 "at_start": arm == args.arms[0]}  # fmt: skip
    r["checkpoint"] = {"interval": args.steps}
    r["run_dir"] = str(run_dir.relative_to(REPO))
    r["wandb_mode"] = "disabled"
    return r


def usable_sources(base: dict, args, root: Path, tw_path: Path) -> tuple[list[dict], dict]:
    """The sources with at least one usable conversation at this seq_length (a source the builder keeps nothing
    of cannot take a share of a mix), found by one build with every source and eta 0 (no target share on the
    agent role, so an empty agent source does not stop it)."""
    sources = copy.deepcopy(base["data"]["sources"])
    sources.append({"name": "textworld", "role": "agent", "paths": [str(tw_path.relative_to(REPO))],
                    "weight": args.tw_weight, "format": "sharegpt"})  # fmt: skip
    check = root / f"source_check-L{args.seq_length}"
    report_path = check / "report.json"
    if not report_path.is_file():
        r = copy.deepcopy(base)
        r["name"] = "ablation-source-check"
        r["data"].update(seq_length=args.seq_length, output_dir=str(check.relative_to(REPO)), heldout_fraction=0.0)
        r["data"]["sources"] = sources
        r["data"]["mix"].update(eta=0.0, total_tokens=args.seq_length)
        recipe = root / f"source_check-L{args.seq_length}.yaml"
        recipe.write_text(yaml.safe_dump({"name": r["name"], "data": r["data"]}, sort_keys=False))
        rc, _ = _kiln(["data", "sft", str(recipe)], root / "source_check.log", args.threads)
        if rc != 0:
            raise SystemExit(f"source check build failed ({rc}): {_tail(root / 'source_check.log')}")
    report = json.loads(report_path.read_text())
    kept = {name: s["kept"] for name, s in report["sources"].items()}
    dropped = [s["name"] for s in sources if kept.get(s["name"], 0) == 0]
    if dropped:
        _say(f"sources with no usable conversation at seq_length {args.seq_length}, left out: {', '.join(dropped)}")
    return [s for s in sources if s["name"] not in dropped], {"kept": kept, "left_out": dropped}


# ---------------------------------------------------------------------------------------------- one arm


def _eval_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if rec["kind"] == "eval":
            out.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k.startswith("val_")})
    return out


def trained_tokens(run_dir: Path, seed: int, args) -> dict:
    """What the run read: its ``steps x global_batch`` packed sequences (the trainer's own order), their
    conversations and loss tokens by role."""
    from kiln.pretrain.sft_data import SFTTrainData

    data = SFTTrainData(run_dir / "data", seed=seed, seq_length=args.seq_length)
    report = json.loads((run_dir / "data" / "report.json").read_text())
    role = {name: s["role"] for name, s in report["sources"].items()}
    out = {"positions": 0, "loss_tokens": {"agent": 0, "general": 0}, "conversations": {"agent": 0, "general": 0}}
    by_source: dict[str, int] = {}
    for i in range(args.steps * args.global_batch):
        k = data.index(i)
        _, mask, _ = data.train.read(k)
        lengths = data.train.conversations(k)
        out["positions"] += args.seq_length
        at = 0
        for name, n in zip(data.train.sources(k), lengths):
            n = int(n)
            out["loss_tokens"][role[name]] += int(mask[at : at + n].sum())
            out["conversations"][role[name]] += 1
            by_source[name] = by_source.get(name, 0) + 1
            at += n
    out["conversations_by_source"] = by_source
    out["mix_agent_example_share"] = report.get("agent_example_share", report.get("agent_share"))
    return out


def train_arm(base, arm, eta, seed, args, root, sources) -> dict:
    run_dir = root / f"{arm}-s{seed}"
    recipe = arm_recipe(base, arm, eta, seed, args, run_dir, sources)
    text = yaml.safe_dump(recipe, sort_keys=False)
    ckpt = run_dir / "checkpoints" / f"step_{args.steps:07d}"
    result = {"arm": arm, "seed": seed, "run_dir": str(run_dir.relative_to(REPO)), "checkpoint": str(ckpt)}
    done = (ckpt / "COMPLETE").exists() and (run_dir / "recipe.yaml").is_file()
    if done and (run_dir / "recipe.yaml").read_text() == text and args.steps in _eval_losses(run_dir):
        _say(f"{arm} seed {seed}: reusing the finished run in {run_dir.relative_to(REPO)}")
        timing = run_dir / "timing.json"  # absent when the run finished after this script was stopped
        result["train_seconds"] = json.loads(timing.read_text())["train_seconds"] if timing.is_file() else None
        result["reused"] = True
    elif args.report_only:
        result["error"] = "not run (--report-only, and no finished run of these settings)"
        return result
    else:
        if run_dir.exists():  # an unfinished or different run: start it again from nothing
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "recipe.yaml").write_text(text)
        _say(f"{arm} seed {seed}: training {args.steps} steps (eta {eta}) -> {run_dir.relative_to(REPO)}")
        rc, secs = _kiln(["train", str(run_dir / "recipe.yaml")], run_dir / "train.log", args.threads)
        result["train_seconds"] = secs
        (run_dir / "timing.json").write_text(json.dumps({"train_seconds": secs}) + "\n")
        if rc != 0 or not (ckpt / "COMPLETE").exists():
            result["error"] = f"kiln train exit {rc}: {_tail(run_dir / 'train.log')}"
            _say(f"{arm} seed {seed}: FAILED ({result['error']})")
            return result
    losses = _eval_losses(run_dir)
    result["losses"] = losses.get(args.steps, {})
    result["losses_step0"] = losses.get(0)
    result["trained"] = trained_tokens(run_dir, seed, args)
    lo = result["losses"]
    _say(
        f"{arm} seed {seed}: trained in {_minutes(result['train_seconds'])} min | val_agent_loss "
        f"{lo.get('val_agent_loss', float('nan')):.4f} | val_general_loss {lo.get('val_general_loss', float('nan')):.4f}"
    )
    return result


def play(model: str, out_dir: Path, label: str, args, manifest: Path) -> dict:
    """``kiln agent eval`` on the unseen games; reused when the report of the same settings exists."""
    seeds = f"{args.eval_seed}-{args.eval_seed + args.games_per_kind - 1}"
    tag = f"g{args.games_per_kind}-e{args.eval_seed}-m{args.max_steps}-t{args.max_new_tokens}"
    report = out_dir / f"agent_eval-{tag}.json"
    log = out_dir / f"agent_eval-{tag}.log"
    if not report.is_file() and args.report_only:
        return {"error": "not run (--report-only, and no report of these settings)"}
    if not report.is_file():
        cmd = ["agent", "eval", model, "--kinds", f"{HELD_IN_KIND},{HELD_OUT_KIND}", "--seeds", seeds,
               "--max-steps", str(args.max_steps), "--max-new-tokens", str(args.max_new_tokens),
               "--exclude", str(manifest), "--out", str(report), "--step-timeout", str(args.step_timeout)]  # fmt: skip
        _say(f"{label}: playing {2 * args.games_per_kind} unseen games ({seeds}, {args.max_steps} steps)")
        rc, secs = _kiln(cmd, log, args.threads)
        if rc != 0 or not report.is_file():
            err = f"kiln agent eval exit {rc}: {_tail(log)}"
            _say(f"{label}: games FAILED ({err})")
            return {"error": err}
        _say(f"{label}: games done in {secs / 60:.1f} min")
    r = json.loads(report.read_text())
    out = {k: r["summary"][k] for k in GAME_METRICS}
    out["episodes"] = r["summary"]["episodes"]
    out["by_kind"] = {k: {"success_rate": v["success_rate"], "won": v["won"], "episodes": v["episodes"]}
                      for k, v in r["by_kind"].items()}  # fmt: skip
    out["report"] = str(report.relative_to(REPO))
    s = r["summary"]
    _say(f"{label}: success {s['success_rate']:.3f} | invalid {s['invalid_action_rate']:.3f} | repeated "
         f"{s['repeated_action_rate']:.3f} | mean score {s['mean_score']:.3f}")  # fmt: skip
    return out


def export_and_play(result: dict, args, manifest: Path) -> dict:
    label = f"{result['arm']} seed {result['seed']}"
    run_dir = REPO / result["run_dir"]
    hf = run_dir / "hf"
    if not hf.is_dir() and args.report_only:
        return {"error": "not run (--report-only, and no export)"}
    if not hf.is_dir():  # exported to a temporary folder first, so an interrupted export is never reused
        tmp = run_dir / "hf.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        rc, _ = _kiln(["export-hf", result["checkpoint"], "--out", str(tmp)], run_dir / "export.log", args.threads)
        if rc != 0:
            return {"error": f"kiln export-hf exit {rc}: {_tail(run_dir / 'export.log')}"}
        tmp.rename(hf)
    return play(str(hf.relative_to(REPO)), run_dir, label, args, manifest)


# ------------------------------------------------------------------------------------------------ report


def _fmt(values: list[float | None], digits: int = 3) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"  # not run or failed: the list under the tables says which
    mean = sum(vals) / len(vals)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({' / '.join('-' if v is None else f'{v:.{digits}f}' for v in values)})"


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f}"


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _separated(a: list[float | None], b: list[float | None]) -> str:
    """'resolved' when every value of a is on the same side of every value of b."""
    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not a or not b:
        return "not measured"
    if len(a) < 2 or len(b) < 2:
        return "one seed: cannot be resolved"
    return "resolved" if max(a) < min(b) or min(a) > max(b) else "not resolved (the seeds overlap)"


def collect(rows: dict[str, list[dict]], baseline_games: dict, seeds: list[int]) -> dict[str, dict[str, list]]:
    """arm -> metric -> per-seed values (None where a step failed). The baseline's losses: step 0, per seed."""
    table: dict[str, dict[str, list]] = {}
    base: dict[str, list] = {"val_agent_loss": [], "val_general_loss": []}
    for seed in seeds:
        step0 = next((r["losses_step0"] for arm in rows for r in rows[arm] if r["seed"] == seed
                      and r.get("losses_step0")), None)  # fmt: skip
        for k in base:
            base[k].append(step0.get(k) if step0 else None)
    for k in GAME_METRICS:
        base[k] = [baseline_games.get(k)]
    for kind in (HELD_IN_KIND, HELD_OUT_KIND):
        base[f"success_{kind}"] = [baseline_games.get("by_kind", {}).get(kind, {}).get("success_rate")]
    table["baseline"] = base
    for arm, results in rows.items():
        t: dict[str, list] = {"val_agent_loss": [], "val_general_loss": []}
        for k in GAME_METRICS:
            t[k] = []
        for kind in (HELD_IN_KIND, HELD_OUT_KIND):
            t[f"success_{kind}"] = []
        for r in results:
            for k in ("val_agent_loss", "val_general_loss"):
                t[k].append(r.get("losses", {}).get(k))
            g = r.get("games", {})
            for k in GAME_METRICS:
                t[k].append(g.get(k))
            for kind in (HELD_IN_KIND, HELD_OUT_KIND):
                t[f"success_{kind}"].append(g.get("by_kind", {}).get(kind, {}).get("success_rate"))
        table[arm] = t
    return table


def direction(table: dict[str, dict[str, list]]) -> list[str]:
    """The three readings of the docstring, from the seed means, each said as measured."""
    m = {arm: {k: _mean(v) for k, v in t.items()} for arm, t in table.items()}
    out = []
    b, h = m["baseline"], m.get("hybrid")
    if h is None:
        return ["The hybrid arm was not run: no reading of the AgentTuning direction."]

    def diff(x, y):
        return None if x is None or y is None else x - y

    a, g = m.get("agent_only"), m.get("general_only")
    if a is not None:
        dh, da = diff(h["val_general_loss"], b["val_general_loss"]), diff(a["val_general_loss"], b["val_general_loss"])
        if dh is not None and da is not None:
            holds = "holds" if dh < da else "does not hold"
            sep = _separated(table["hybrid"]["val_general_loss"], table["agent_only"]["val_general_loss"])
            out.append(f"(a) general loss change from the baseline: hybrid {dh:+.4f}, agent-only {da:+.4f}; "
                       f"'hybrid's general loss rises less than agent-only's' {holds} ({sep}); agent-only's general "
                       f"loss {'rose above' if da > 0 else 'did not rise above'} the baseline's.")  # fmt: skip
    if g is not None and None not in (h["val_agent_loss"], g["val_agent_loss"], b["val_agent_loss"]):
        holds = "holds" if h["val_agent_loss"] < min(b["val_agent_loss"], g["val_agent_loss"]) else "does not hold"
        sep = _separated(table["hybrid"]["val_agent_loss"], table["general_only"]["val_agent_loss"])
        out.append(f"(b) agent loss: baseline {b['val_agent_loss']:.4f}, hybrid {h['val_agent_loss']:.4f}, "
                   f"general-only {g['val_agent_loss']:.4f}, agent-only "
                   f"{a['val_agent_loss'] if a and a['val_agent_loss'] is not None else float('nan'):.4f}: "
                   f"'hybrid below baseline and general-only' {holds} (hybrid vs general-only: {sep}).")  # fmt: skip
    if h["success_rate"] is not None and b["success_rate"] is not None:
        ok = h["success_rate"] >= b["success_rate"] and h["invalid_action_rate"] <= b["invalid_action_rate"]
        out.append(f"(c) games: success baseline {b['success_rate']:.3f} -> hybrid {h['success_rate']:.3f}, invalid "
                   f"actions {b['invalid_action_rate']:.3f} -> {h['invalid_action_rate']:.3f}, repeated "
                   f"{b['repeated_action_rate']:.3f} -> {h['repeated_action_rate']:.3f}: 'hybrid gains agent skill "
                   f"(success not lower, invalid actions not higher)' {'holds' if ok else 'does not hold'}.")  # fmt: skip
        if a is not None and a["success_rate"] is not None:
            out.append(f"    agent-only: success {a['success_rate']:.3f}, invalid {a['invalid_action_rate']:.3f}, "
                       f"repeated {a['repeated_action_rate']:.3f}; hybrid vs agent-only success: "
                       f"{_separated(table['hybrid']['success_rate'], table['agent_only']['success_rate'])}.")  # fmt: skip
    return out


def plot(table: dict[str, dict[str, list]], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_agent_loss", "held-out agent loss"), ("val_general_loss", "held-out general loss"),
              ("success_rate", "game success rate"), ("invalid_action_rate", "invalid-action rate"),
              ("repeated_action_rate", "repeated-action rate"), ("mean_score", "mean game score")]  # fmt: skip
    arms = list(table)
    colors = {"baseline": "#999999", "hybrid": "#2b7bba", "agent_only": "#d95f02", "general_only": "#1b9e77"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), layout="constrained")
    for ax, (key, title) in zip(axes.flat, panels):
        for x, arm in enumerate(arms):
            vals = [v for v in table[arm][key] if v is not None]
            if not vals:
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
                continue
            ax.bar(x, sum(vals) / len(vals), color=colors.get(arm, "#777777"), alpha=0.75, width=0.7)
            jitter = [(i - (len(vals) - 1) / 2) * 0.12 for i in range(len(vals))]
            ax.scatter([x + j for j in jitter], vals, color="black", s=14, zorder=3)
        ax.set_xticks(range(len(arms)), [a.replace("_", "-") for a in arms], fontsize=9)
        ax.set_title(title, fontsize=10)
        if key.endswith("_rate"):
            ax.set_ylim(0, 1.05)
        elif key == "mean_score":
            ax.set_ylim(bottom=0)
        if "loss" in key:  # the differences are small next to the loss itself: zoom on the range
            vals = [v for arm in arms for v in table[arm][key] if v is not None]
            if vals:
                pad = max(0.02, (max(vals) - min(vals)) * 0.3)
                ax.set_ylim(min(vals) - pad, max(vals) + pad)
    fig.suptitle("SFT ablation from SmolLM2-135M-Instruct: bars = mean over seeds, points = seeds\n" + subtitle,
                 fontsize=10)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(args, table, rows, source_info, tw_manifest, wall_s, command, plot_path) -> str:
    cols = [("val_agent_loss", "held-out agent loss", 4), ("val_general_loss", "held-out general loss", 4),
            ("success_rate", "success", 3), (f"success_{HELD_IN_KIND}", f"success {HELD_IN_KIND} (held-in kind)", 3),
            (f"success_{HELD_OUT_KIND}", f"success {HELD_OUT_KIND} (held-out kind)", 3),
            ("invalid_action_rate", "invalid actions", 3), ("repeated_action_rate", "repeated actions", 3),
            ("mean_score", "mean score", 3)]  # fmt: skip
    lines = [
        f"## {datetime.date.today()} - {platform.node()} ({os.cpu_count()} CPU cores, no GPU, {platform.machine()})",
        "",
        f"Command: `{command}`; "
        + (
            "--report-only: nothing was run, the table is of the runs and game reports an earlier run of these "
            "settings left (see the per-arm training minutes below)."
            if args.report_only
            else f"wall time {wall_s / 60:.1f} min (the machine was shared with other jobs)."
        ),
        "",
        f"Settings: seeds {args.seeds} (the SFT data seed: held-out rows, mix sampling, packing and data order); "
        f"{args.steps} steps x {args.global_batch} packed sequences x {args.seq_length} tokens per arm "
        f"({args.steps * args.global_batch * args.seq_length:,} positions, the equal token budget); lr and schedule "
        f"of hybrid_cpu.yaml; held-out at most {args.heldout_max} conversations per source. TextWorld: "
        f"{tw_manifest['records']} expert trajectories of kinds {args.tw_kinds}, seeds {args.tw_seeds} (agent weight "
        f"{args.tw_weight}). Games: {args.games_per_kind} unseen `{HELD_IN_KIND}` + {args.games_per_kind} "
        f"`{HELD_OUT_KIND}` (seeds {args.eval_seed}-{args.eval_seed + args.games_per_kind - 1}), at most "
        f"{args.max_steps} steps, greedy, {args.max_new_tokens} new tokens per step.",
        "",
    ]
    if source_info["left_out"]:
        lines += [f"Sources with no conversation that fits seq_length {args.seq_length} (left out of every arm): "
                  f"{', '.join(source_info['left_out'])}.", ""]  # fmt: skip
    lines += [
        "Each cell: mean over seeds (per-seed values in seed order). Baseline: the untrained SmolLM2-135M-Instruct "
        "(its held-out losses per seed's split; its games once, greedy decoding being deterministic).",
        "",
        "| arm | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for arm, t in table.items():
        lines.append(f"| {arm.replace('_', '-')} | " + " | ".join(_fmt(t[k], d) for k, _, d in cols) + " |")
    lines += ["", "What each arm trained on (per seed):", "",
              "| arm | seed | train min | agent convs | general convs | agent loss tokens | general loss tokens | "
              "TextWorld convs |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    errors = []
    for arm, results in rows.items():
        for r in results:
            tr = r.get("trained")
            if tr is None:
                state = "not run" if "not run" in r.get("error", "") else "failed"
                lines.append(f"| {arm} | {r['seed']} | - | {state} | | | | |")
            else:
                lines.append(
                    f"| {arm} | {r['seed']} | {_minutes(r['train_seconds'])}{' (reused)' if r.get('reused') else ''} | "
                    f"{tr['conversations']['agent']} | {tr['conversations']['general']} | "
                    f"{tr['loss_tokens']['agent']:,} | {tr['loss_tokens']['general']:,} | "
                    f"{tr['conversations_by_source'].get('textworld', 0)} |"
                )
            for what in ("error",):
                if r.get(what):
                    errors.append(f"- {arm} seed {r['seed']} training: {r[what]}")
            if r.get("games", {}).get("error"):
                errors.append(f"- {arm} seed {r['seed']} games: {r['games']['error']}")
    lines += ["", "Reading of the AgentTuning direction (as measured; see the script's docstring for the rules):", ""]
    lines += direction(table)
    if errors:
        lines += ["", "Failures:", "", *errors]
    lines += ["", f"![SFT ablation]({plot_path.name})", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1", help="SFT data seeds, comma-separated (default 0,1)")
    parser.add_argument("--arms", default="hybrid,agent_only,general_only", help="arms to run, comma-separated")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm (default 6)")
    parser.add_argument("--seq-length", type=int, default=512, help="packed sequence length (default 512)")
    parser.add_argument("--global-batch", type=int, default=4, help="packed sequences per step (default 4)")
    parser.add_argument("--heldout-max", type=int, default=8, help="held-out conversations per source at most")
    parser.add_argument("--tw-kinds", default="tiny,small,medium", help="held-in TextWorld kinds of the training data")
    parser.add_argument("--tw-seeds", default="0-59", help="TextWorld training game seeds (default 0-59)")
    parser.add_argument("--tw-weight", type=float, default=0.5, help="TextWorld's weight in the agent role "
                        "(the shared agent sources' weights sum to 1)")  # fmt: skip
    parser.add_argument("--games-per-kind", type=int, default=2, help="unseen games per kind (default 2)")
    parser.add_argument("--eval-seed", type=int, default=1000, help="first unseen game seed (default 1000)")
    parser.add_argument("--max-steps", type=int, default=5, help="step limit of a game (default 5; the "
                        "evaluated kinds' walkthroughs are 3 steps)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per game step (default "
                        "64; the expert's replies are at most 77, 99%% at most 66)")  # fmt: skip
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=600.0,
        help="seconds a game step may take (default 600: the 30 s default fired on a starved machine, and the "
        "textworld thread it left running crashed the next game's load)",
    )
    parser.add_argument(
        "--parallel-arms", type=int, default=1, help="arms trained at once (default 1; each is one process)"
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    parser.add_argument("--root", default="runs/ablation", help="where the runs go (default runs/ablation)")
    parser.add_argument("--no-record", action="store_true", help="write the table and plot under --root instead")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: tabulate the finished runs and game reports of these settings, the rest as not run",
    )
    args = parser.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in args.arms if a not in ARM_RECIPES]:
        parser.error(f"unknown arm(s) {unknown}: choose from {list(ARM_RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    command = "python -m benchmarks.sft_ablation" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                     if (argv if argv is not None else sys.argv[1:]) else "")  # fmt: skip
    start = time.perf_counter()
    sizes = f"L{args.seq_length}-b{args.global_batch}-n{args.steps}-h{args.heldout_max}-tw{args.tw_weight}"
    root = REPO / args.root
    arm_root = root / sizes
    arm_root.mkdir(parents=True, exist_ok=True)

    tw_path = textworld_source(args, root)
    manifest = Path(f"{tw_path}.manifest.json")
    tw_manifest = json.loads(manifest.read_text())
    base, etas = base_recipe()
    sources, source_info = usable_sources(base, args, root, tw_path)

    # Games run in one background worker while arms train (--parallel-arms at a time, in seed-major order, so
    # an interrupted run has whole seeds first): each finished arm queues its export and games there.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    trainers = concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel_arms)
    baseline_future = pool.submit(play, "smollm2", root / "baseline", "baseline (untrained SmolLM2)", args, manifest)

    def train_then_queue(arm: str, seed: int):
        result = train_arm(base, arm, etas[arm], seed, args, arm_root, sources)
        games = None if "error" in result else pool.submit(export_and_play, result, args, manifest)
        return result, games

    jobs = {(arm, seed): trainers.submit(train_then_queue, arm, seed) for seed in seeds for arm in args.arms}
    rows: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for arm in args.arms:
        for seed in seeds:
            result, games = jobs[arm, seed].result()
            if games is not None:
                result["games"] = games.result()
            rows[arm].append(result)
    baseline_games = baseline_future.result()
    trainers.shutdown()
    pool.shutdown()
    wall = time.perf_counter() - start

    table = collect(rows, baseline_games, seeds)
    out_md, out_png = (RESULTS, PLOT) if not args.no_record else (root / "sft_ablation.md", root / "sft_ablation.png")
    subtitle = (f"{args.steps} steps x {args.global_batch} x {args.seq_length} tokens per arm, seeds {args.seeds}, "
                f"{2 * args.games_per_kind} unseen games")  # fmt: skip
    plot(table, out_png, subtitle)
    text = markdown(args, table, rows, source_info, tw_manifest, wall, command, out_png)
    print(text)
    (root / f"results-{sizes}.json").write_text(json.dumps({"table": table, "rows": rows}, indent=2) + "\n")
    if args.no_record:
        out_md.write_text(text + "\n")
    else:
        append_result(out_md, "AgentTuning ablation at CPU scale: hybrid vs agent-only vs general-only SFT",
                      "benchmarks/sft_ablation.py", text)  # fmt: skip
    _say(f"done in {wall / 60:.1f} min: {out_md.relative_to(REPO)}, {out_png.relative_to(REPO)}")
    failed = any("error" in r or "error" in r.get("games", {}) for rs in rows.values() for r in rs)
    return 1 if failed or "error" in baseline_games else 0


if __name__ == "__main__":
    raise SystemExit(main())
