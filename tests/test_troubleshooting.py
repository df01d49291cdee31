"""docs/troubleshooting.md quotes the errors as kiln prints them: each command below is run and its `kiln: error:`
line (or dry-run row) must appear in the page word for word, so the page cannot drift from the messages."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "troubleshooting.md"

COMMANDS = [
    ["train", "recipes/pretrain/tiny.yaml", "parallel.tpp=2"],
    ["data", "run", "recipes/data/web.yaml", "filterz=1"],
    ["train", "tiny", "--dry-run", "--world-size", "6", "parallel.tp=2", "parallel.pp=2"],
    ["train", "tiny", "--dry-run", "--world-size", "8", "parallel.tp=8"],
    ["train", "tiny", "--dry-run", "--world-size", "4", "parallel.global_batch=12"],
    ["train", "recipes/pretrain/tiny.yaml", "--dry-run", "--world-size", "2", "parallel.pp=2", "parallel.zero_stage=2"],
    ["train", "tiny", "resume=/runs/x/checkpoints/step_0000100"],
    ["train", "recipes/pretrain/llama_1b.yaml"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a[:2] + a[-1:]))
def test_quoted_error_is_what_kiln_prints(argv, tmp_path, monkeypatch, capsys):
    from kiln.cli import main

    monkeypatch.chdir(REPO)  # the page quotes paths as a user at the repository root sees them
    assert main([*argv, f"run_dir={tmp_path / 'run'}"] if argv[0] == "train" else argv) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kiln: error:")]
    assert line in PAGE.read_text(encoding="utf-8")


def test_quoted_dry_run_row_is_the_plan(capsys):
    from kiln.cli import main

    assert main(["train", "llama_70b", "--dry-run", "--world-size", "64", "parallel.pp=1"]) == 0
    (row,) = [x for x in capsys.readouterr().out.splitlines() if x.split()[:1] == ["0"]]
    assert row in PAGE.read_text(encoding="utf-8")
