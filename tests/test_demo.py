"""`kiln demo` as the README runs it: every stage, a short console, the full logs in the run directory, resume."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiln.demo import STAGES


def _demo(cwd, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kiln", "demo", "--output", "run", "--max-docs", "600", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_console_is_short_and_logs_are_in_the_run_dir(tmp_path):
    proc = _demo(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    console = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert len(console) <= 60, "\n".join(console)
    assert " | INFO " not in proc.stderr and "it/s]" not in proc.stderr  # no loguru lines, no tqdm bars
    for i, stage in enumerate(STAGES, start=1):
        assert f"kiln demo [{i}/{len(STAGES)}] {stage}:" in proc.stdout
    assert "balanced" in proc.stdout
    summary = proc.stdout.split("kiln demo: run")[-1]  # the final table
    rows = [line.split("│")[1].strip() for line in summary.splitlines() if line.startswith("│ ")]
    assert rows == list(STAGES)
    run = tmp_path / "run"
    assert (run / "logs" / "demo.log").is_file()
    assert (
        "Launching pipeline for rank=0"
        in (run / "data" / "logs" / "read_filter" / "logs" / "task_00000.log").read_text()
    )
    assert (run / "data" / "logs" / "read_filter.log").is_file()
    assert (run / "data" / "tokens" / "demo_meco.meta.json").is_file()

    again = _demo(tmp_path)  # re-running resumes: every stage's tasks are skipped
    assert again.returncode == 0, again.stderr[-3000:]
    stage_lines = [line for line in again.stderr.splitlines() if line.lstrip().startswith("stage ")]
    assert stage_lines and all("resumed" in line for line in stage_lines)
