"""`kiln agent gen` and `kiln agent eval`. Importing this module imports none of textworld, torch or datatrove:
every heavy import is inside the command functions (`kiln --help` stays light)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

GEN_EPILOG = """examples:
  kiln agent gen --kinds tiny,small,medium --seeds 0-99 --out runs/agent/train.jsonl
  kiln agent gen --kinds rooms=4,objects=6,quest=4,goal=detailed --seeds 0-9 --out runs/agent/custom.jsonl

Each line of --out is an AgentInstruct-style ShareGPT record (instruction, "Ok." with loss false, then
observation / "Thought: ...\\nAction: ..." turns with loss true): use it as a `format: sharegpt` agent source
of `kiln data sft`. <out>.manifest.json lists the games, so `kiln agent eval --exclude` can keep eval unseen."""

EVAL_EPILOG = """examples:
  kiln agent eval expert                      # upper bound: the walkthrough
  kiln agent eval random --seeds 1000-1049    # lower bound: a random admissible command
  kiln agent eval smollm2 --seeds 1000-1001 --max-steps 5
  kiln agent eval runs/sft-hybrid --exclude runs/agent/train.jsonl.manifest.json \\
      --trajectories runs/agent/heldout.jsonl

By default the games are unseen: seeds 1000-1019 of the held-in kind 'small' and of the held-out kind
'small-brief' (brief goals: never generated for training by default)."""

MODEL_HELP = (
    "a kiln model directory, an HF model directory, a .gguf file, 'smollm2' (SmolLM2-135M-Instruct), or a built-in "
    "baseline: 'expert' (the walkthrough) or 'random' (a random admissible command)"
)


def _default_cache() -> Path:
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"]) / "textworld"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kiln" / "textworld"


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    agent = subparsers.add_parser(
        "agent",
        help="TextWorld agent environment: expert trajectories and agent evaluation",
        description="Generate TextWorld games offline, record expert ReAct trajectories as SFT data, and evaluate "
        "agents (a model or a baseline) on unseen games.",
        formatter_class=fmt,
    )
    sub = agent.add_subparsers(dest="agent_command", metavar="COMMAND")
    agent.set_defaults(func=lambda args: (agent.print_help(), 2)[1])

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache", default=None, help="game cache folder (default: $KILN_CACHE_DIR/textworld)")
    common.add_argument("--step-timeout", type=float, default=30.0, help="seconds one environment step may take")
    common.add_argument("-q", "--quiet", action="store_true", help="no per-game progress lines")

    p = sub.add_parser(
        "gen",
        parents=[common],
        help="generate games and record expert trajectories (SFT data)",
        description="Generate TextWorld games by kind and seed and record the expert's trajectory of each in "
        "ReAct form (Thought / Action / Observation), with thoughts built from the game state and the plan.",
        epilog=GEN_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--kinds", default="tiny,small,medium", help="game kinds, comma-separated (names or inline specs)")
    p.add_argument("--seeds", default="0-19", help="seeds: '0-99', '1,5,7' (default 0-19)")
    p.add_argument("--out", default="runs/agent/train.jsonl", help="output JSONL of ShareGPT records")
    p.add_argument("--max-steps", type=int, default=50, help="step limit of an expert episode")
    p.set_defaults(func=cmd_gen)

    p = sub.add_parser(
        "eval",
        parents=[common],
        help="play unseen games with a model or a baseline; offline trajectory metrics",
        description="Play unseen TextWorld games in the training prompt format: success rate, mean score, "
        "invalid-action rate, repeated-action rate, steps to win; with --trajectories, also the format-parse rate "
        "and next-action exact match on held-out trajectories. Writes a JSON report.",
        epilog=EVAL_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--kinds", default="small,small-brief", help="game kinds, comma-separated")
    p.add_argument("--seeds", default="1000-1019", help="seeds (default 1000-1019, disjoint from gen's default)")
    p.add_argument("--game", action="append", default=[], help="play this game file (repeatable; replaces kinds/seeds)")
    p.add_argument("--exclude", default=None, help="a gen manifest: refuse to evaluate on any game it trained on")
    p.add_argument("--max-steps", type=int, default=30, help="step limit of an episode")
    p.add_argument("--trajectories", nargs="*", default=[], help="held-out trajectory files for offline metrics")
    p.add_argument("--trajectory-limit", type=int, default=None, help="at most this many turns of offline metrics")
    p.add_argument("--no-games", action="store_true", help="offline metrics only")
    p.add_argument("--template", default="auto", help="chat template: auto, tokenizer, chatml, llama2 or a .jinja")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per step")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline and of sampling")
    p.add_argument("--out", default=None, help="report JSON (default runs/agent/eval-<model>.json)")
    p.set_defaults(func=cmd_eval)


def _error(command: str, message: str) -> int:
    print(f"kiln agent {command}: error: {message}", file=sys.stderr)
    return 2


def _games(args, command: str):
    from kiln.agent.games import make_games, parse_kind, parse_seeds

    kinds = [parse_kind(k.strip()) for k in args.kinds.split(",") if k.strip()]
    seeds = parse_seeds(args.seeds)
    if not kinds or not seeds:
        raise ValueError("no games: give at least one kind and one seed")
    cache = Path(args.cache) if args.cache else _default_cache()

    def progress(done, total, ref):
        if not args.quiet:
            print(f"agent {command}: games {done}/{total} ready ({ref.game_id})", file=sys.stderr, flush=True)

    return make_games(kinds, seeds, cache, progress), kinds, seeds


def cmd_gen(args) -> int:
    from kiln.agent.games import GameFileError
    from kiln.agent.trajectories import expert_records, write_records

    start = time.perf_counter()
    try:
        refs, kinds, seeds = _games(args, "gen")
    except (ValueError, GameFileError) as e:
        return _error("gen", str(e))

    def progress(done, total, episode):
        if not args.quiet:
            state = "won" if episode.won else "NOT WON"
            print(
                f"agent gen: {done}/{total} | {episode.game_id} {state} in {episode.steps} steps",
                file=sys.stderr,
                flush=True,
            )

    records, failed = expert_records(refs, max_steps=args.max_steps, step_timeout=args.step_timeout, progress=progress)
    out = Path(args.out)
    n = write_records(records, out)
    manifest = {
        "records": n,
        "kinds": [k.to_dict() for k in kinds],
        "seeds": seeds,
        "games": [{"game": r.game_id, "kind": r.kind_dict()["name"], "key": r.kind.key, "seed": r.seed} for r in refs],
        "not_won": failed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    Path(f"{out}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    steps = sum(r["meta"]["steps"] for r in records)
    print(f"kiln agent gen: {n} trajectories ({steps} steps) from {len(refs)} games -> {out}")
    if failed:
        print(f"kiln agent gen: the expert did not win {len(failed)} game(s), left out: {', '.join(failed)}")
    return 0


def _check_unseen(refs, manifest_path: str) -> None:
    manifest = json.loads(Path(manifest_path).read_text())
    trained = {(g["key"], g["seed"]) for g in manifest.get("games", [])}
    seen = [r.game_id for r in refs if r.kind is not None and (r.kind.key, r.seed) in trained]
    if seen:
        raise ValueError(f"{len(seen)} eval game(s) were training games of {manifest_path}: {', '.join(seen[:8])}")


def cmd_eval(args) -> int:
    from kiln.agent.evaluate import evaluate_games, progress_line, trajectory_metrics
    from kiln.agent.games import GameFileError, game_from_file
    from kiln.agent.policies import BUILTIN, make_policy

    if args.no_games and not args.trajectories:
        return _error("eval", "--no-games needs --trajectories")
    if args.trajectories and args.model in BUILTIN:
        return _error("eval", f"offline trajectory metrics need a model, not the built-in {args.model!r} policy")
    refs = []
    try:
        if not args.no_games:
            if args.game:
                refs = [game_from_file(g) for g in args.game]
            else:
                refs, _, _ = _games(args, "eval")
            if args.exclude:
                _check_unseen(refs, args.exclude)
    except (ValueError, GameFileError, OSError) as e:
        return _error("eval", str(e))
    model_kwargs = {} if args.model in BUILTIN else {
        "template": args.template,
        "max_new_tokens": args.max_new_tokens,
        "greedy": not args.sample,
        "top_p": args.top_p,
        "temperature": args.temperature,
    }  # fmt: skip
    policy = make_policy(args.model, seed=args.seed, **model_kwargs)

    def progress(done, total, episodes, elapsed):
        if not args.quiet:
            print(progress_line(done, total, episodes, elapsed), file=sys.stderr, flush=True)

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "agent_command", "verbose")}
    report: dict = {"model": args.model, "options": options}
    if refs:
        report.update(evaluate_games(refs, policy, args.max_steps, args.step_timeout, progress))
    if args.trajectories:
        report["trajectories"] = trajectory_metrics(args.trajectories, policy, limit=args.trajectory_limit)
    name = Path(args.model.rstrip("/")).name or "model"
    out = Path(args.out or f"runs/agent/eval-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if refs:
        s = report["summary"]
        print(
            f"kiln agent eval {args.model}: {s['episodes']} games | success {s['success_rate']:.3f} | mean score "
            f"{s['mean_score']:.3f} | invalid {s['invalid_action_rate']:.3f} | repeated {s['repeated_action_rate']:.3f}"
            f" | steps to win {s['mean_steps_to_win'] if s['mean_steps_to_win'] is not None else '-'}"
        )
        for kind, k in report["by_kind"].items():
            print(f"  {kind:<16} success {k['success_rate']:.3f} ({k['won']}/{k['episodes']})")
    if args.trajectories:
        t = report["trajectories"]
        print(
            f"  trajectories: {t['turns']} turns | parse rate {t['format_parse_rate']} | next-action exact match "
            f"{t['next_action_exact_match']}"
        )
    print(f"report -> {out}")
    return 0
