"""`kiln demo` as the README runs it: every stage, a short console, the full logs in the run directory, resume.

CI runs the --quick form end to end (the same stages at smaller sizes); the full one is the README's command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kiln.demo import STAGES, data_kind


def _demo(cwd, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kiln", "demo", "--output", "run", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three demo runs (the first trains twice); about 4 minutes on an idle 2-core machine
def test_demo_console_is_short_and_logs_are_in_the_run_dir(tmp_path):
    proc = _demo(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    console = proc.stdout.splitlines() + proc.stderr.splitlines()
    # 60 lines for corpus -> tokenize (accounting table, one decoded document, summary); each later stage adds
    # its two progress lines, the command it runs and its summary row
    assert len(console) <= 60 + 4 * (len(STAGES) - 4), "\n".join(console)
    assert " | INFO " not in proc.stderr and "it/s]" not in proc.stderr  # no loguru lines, no tqdm bars
    for i, stage in enumerate(STAGES, start=1):
        assert f"kiln demo [{i}/{len(STAGES)}] {stage}:" in proc.stdout
    assert "balanced" in proc.stdout
    summary = proc.stdout.split("kiln demo: run")[-1]  # the final table
    rows = [line.split("│")[1].strip() for line in summary.splitlines() if line.startswith("│ ")]
    assert [r for r in rows if r] == list(STAGES)  # a long key figure may wrap onto a row with no stage name
    run = tmp_path / "run"
    assert (run / "logs" / "demo.log").is_file()
    assert (
        "Launching pipeline for rank=0"
        in (run / "data" / "logs" / "read_filter" / "logs" / "task_00000.log").read_text()
    )
    assert (run / "data" / "logs" / "read_filter.log").is_file()
    assert (run / "data" / "tokens" / "demo_meco.meta.json").is_file()

    # pretraining: 4 ranks (each wrote its log), MeCo then the plain cooldown, a checkpoint, the curve
    pretrain = run / "pretrain"
    assert sorted(p.name for p in (pretrain / "logs").glob("train_rank*.log")) == [
        f"train_rank{r}.log" for r in range(4)
    ]
    assert "-m kiln train pretrain/demo" in (run / "logs" / "pretrain.log").read_text()
    assert "TP2xPP2, MeCo 1-18 + plain 19-20" in proc.stdout
    records = [json.loads(line) for line in (pretrain / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["kind"] == "train") == 20
    assert (pretrain / "checkpoints" / "step_0000020").is_dir()
    assert (pretrain / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"

    # the hybrid mix: expert TextWorld trajectories + instructions made from the curated documents, both halves
    # in the built data at the recipe's eta, then SFT from the last pretraining checkpoint
    assert (run / "agent" / "games").is_dir()  # the game cache is the run's own, not ~/.cache
    assert len((run / "agent" / "train" / "trajectories.jsonl").read_text().splitlines()) == 8
    general = [json.loads(line) for line in (run / "general" / "instructions.jsonl").read_text().splitlines()]
    assert {r["instruction"].split()[0] for r in general} == {"Continue", "Which"}
    report = json.loads((run / "sft_data" / "report.json").read_text())
    assert set(report["sources"]) == {"textworld", "corpus_instructions"}
    assert report["agent_share"] == pytest.approx(0.5, abs=0.01)
    assert "initial weights from run/pretrain/checkpoints/step_0000020" in (run / "logs" / "sft.log").read_text()
    sft = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_agent_loss", "val_general_loss"} <= {k for r in sft for k in r}
    assert (run / "sft" / "checkpoints" / "step_0000004").is_dir()

    # the export loads in transformers with the chat template the SFT data was rendered with; the generations
    # without and with the metadata prefix are printed; the agent plays games it never saw
    hf = run / "hf"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "<|im_start|>" in (hf / "chat_template.jinja").read_text()
    generations = (run / "generations.txt").read_text().splitlines()
    assert generations[0].startswith("transformers LlamaForCausalLM") and len(generations) == 3
    assert generations[1].lstrip().startswith("plain ") and generations[2].lstrip().startswith("URL: ")
    for line in generations[1:]:
        assert line in proc.stdout
    evaluation = json.loads((run / "agent" / "eval" / "report.json").read_text())
    assert evaluation["summary"]["episodes"] == 2
    assert {e["game"] for e in evaluation["episodes"]} == {"tiny-s1000", "tiny-s1001"}
    assert "agent_eval: success " in proc.stdout

    again = _demo(tmp_path, "--quick")  # re-running resumes: every stage's tasks are skipped
    assert again.returncode == 0, again.stderr[-3000:]
    stage_lines = [line for line in again.stderr.splitlines() if line.lstrip().startswith("stage ")]
    assert stage_lines and all("resumed" in line for line in stage_lines)
    assert "pretrain: loss" in again.stdout and "(resumed)" in again.stdout.split("pretrain: loss")[1].splitlines()[0]

    other = _demo(tmp_path)  # the full demo does not silently resume a --quick run directory
    assert other.returncode == 2 and "was made by another demo run (scale 'quick'" in other.stderr


@pytest.mark.slow
def test_demo_reads_your_own_text_with_data(tmp_path):
    docs = tmp_path / "mine"
    docs.mkdir()
    lines = [
        f"Document {i} is about the kiln that fires clay pots at a steady heat, and the potter who watches "
        f"the colour of the flame through a small window, waiting for the glaze to melt into glass number {i}."
        for i in range(40)
    ]
    (docs / "pots.txt").write_text("\n".join(lines) + "\n")
    proc = _demo(tmp_path, "--quick", "--data", str(docs), "--stop-after", "curate")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "your text data: 1 files" in proc.stdout
    kept = tmp_path / "run" / "data" / "output"
    assert kept.is_dir() and not (tmp_path / "run" / "corpus").exists()  # the embedded corpus is never built


def test_data_kind_names_what_it_cannot_read(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"")
    (tmp_path / "_SUCCESS").write_text("")  # bookkeeping files are skipped, as the curation reader does
    assert data_kind(tmp_path) == "jsonl"
    (tmp_path / "b.csv").write_text("x")
    from kiln.config import ConfigError

    with pytest.raises(ConfigError, match="expected files of one kind .* unknown: b.csv"):
        data_kind(tmp_path)
