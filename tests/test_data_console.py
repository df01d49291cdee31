"""The console of a local `kiln data run`: one line per stage and errors; datatrove's log lines go to files."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time

from test_data_run import write_recipe, write_shards

from kiln.data_pipeline.console import StageProgress

from conftest import REPO


def _stage_names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "logs").iterdir() if p.is_dir())


def _kiln(*argv: str) -> subprocess.CompletedProcess:
    # stdout/stderr are pipes, not a terminal: each stage prints its final line only
    return subprocess.run([sys.executable, "-m", "kiln", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_local_run_prints_one_line_per_stage_and_logs_to_files(tmp_path):
    inp = tmp_path / "in"
    write_shards(inp, n_files=2, docs_per_file=30)
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", [{"kind": "jsonl", "path": str(inp)}], run_dir, tasks=2)
    proc = _kiln("data", "run", str(recipe), "progress=true")  # per-task bars would be on without the quiet path
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    stages = _stage_names(run_dir)
    assert stages == ["dedup_0", "dedup_1", "dedup_filter", "read_filter"]
    lines = [line for line in console.splitlines() if line.startswith("  stage ")]
    assert sorted(line.split()[1] for line in lines) == stages  # exactly one line per stage
    assert all(" 2/2 tasks " in line or " 1/1 tasks " in line for line in lines if "dedup_0" not in line)
    assert " | INFO " not in console and " | SUCCESS " not in console and "Documents:" not in console
    assert "\r" not in console  # not a terminal: no in-place updates
    for stage in stages:
        parent_log = (run_dir / "logs" / f"{stage}.log").read_text()
        assert "| datatrove.executor.local:run:" in parent_log and "Stats: All" in parent_log  # datatrove's lines
        task_log = (run_dir / "logs" / stage / "logs" / "task_00000.log").read_text()
        assert "Launching pipeline for rank=0" in task_log

    again = _kiln("data", "run", str(recipe))  # resume: every task is skipped, still one line per stage
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stderr.splitlines() if line.startswith("  stage ")]
    assert len(lines) == len(stages) and "(resumed: 2 skipped)" in lines[0] and " | INFO " not in again.stderr


def test_progress_line_in_place_on_a_terminal_and_final_otherwise():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    done = iter([1, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4])
    tty = Terminal()
    progress = StageProgress("read_filter", 4, lambda: next(done), stream=tty, interval=0.01).start()
    while tty.getvalue().count("\r") < 2:
        time.sleep(0.005)  # the progress thread redraws every 0.01 s
    progress.finish()
    assert tty.getvalue().startswith("\r  stage read_filter ")
    assert tty.getvalue().endswith(" s  (resumed: 1 skipped)\n") and tty.getvalue().count("\n") == 1

    pipe = io.StringIO()
    progress = StageProgress("dedup_filter", 4, lambda: 2, stream=pipe).start()
    progress.finish(failed=True)
    assert pipe.getvalue().count("\n") == 1 and "\r" not in pipe.getvalue()
    assert pipe.getvalue().startswith("  stage dedup_filter       2/4 tasks ")
    assert pipe.getvalue().endswith(" s  (failed, resumed: 2 skipped)\n")


def test_verbose_keeps_datatrove_executor(tmp_path):
    from datatrove.executor import LocalPipelineExecutor

    from kiln.data_pipeline.console import QuietLocalExecutor
    from kiln.data_pipeline.recipe import ExecutorConfig
    from kiln.data_pipeline.runner import Stage, make_executors

    stages = [Stage("a", [], 1)]
    kiln_logger = logging.getLogger("kiln")
    level = kiln_logger.level
    try:
        kiln_logger.setLevel(logging.INFO)
        (quiet,) = make_executors(stages, ExecutorConfig(tasks=1), tmp_path, "kiln-t")
        kiln_logger.setLevel(logging.DEBUG)  # what `kiln -v` sets
        (verbose,) = make_executors(stages, ExecutorConfig(tasks=1), tmp_path, "kiln-t")
    finally:
        kiln_logger.setLevel(level)
    assert isinstance(quiet, QuietLocalExecutor) and quiet.stage_log == str(tmp_path / "a.log")
    assert type(verbose) is LocalPipelineExecutor
