"""A quiet console for local runs: one progress line per stage, errors, and every datatrove log line on disk.

datatrove logs through loguru to stderr: per task, `add_task_logger` adds a stderr sink at INFO when the task's
``local_rank`` is 0 (ERROR otherwise) next to the task's file ``<logs>/<stage>/logs/task_<rank>.log``, and
`close_task_logger` re-adds a DEBUG stderr sink afterwards; the pool logs "k/N tasks completed" through it. A
local run of a recipe prints hundreds of lines that way. So `QuietLocalExecutor`:

- runs every task with a non-zero local rank: the task's console sink is ERROR only, its file keeps everything;
- after each task (in the pool process that ran it) and around the whole stage (in the parent), routes loguru
  to ``<logs>/<stage>.log`` at DEBUG plus stderr at ERROR;
- shows `StageProgress`: "  stage read_filter      3/4 tasks   12.3 s", counted from datatrove's completion
  markers, updated in place on a terminal, one final line otherwise.

We subclass LocalPipelineExecutor because the local rank and the sinks are only reachable from inside
`_run_for_rank` and `run` (no option or hook for them). Under ``kiln -v`` (`kiln.logs.is_verbose`) the runner
uses datatrove's executor unchanged, with its console output as it is. Ray and Slurm are not affected.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.utils.logging import logger, setup_default_logger

# datatrove's task-log format, so <stage>.log reads like the task logs next to it
LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"


def route_loguru(stage_log: str | Path) -> None:
    """Everything (DEBUG and up) to ``stage_log`` (appended: a resumed run adds to it), only errors to stderr."""
    logger.remove()
    logger.add(str(stage_log), level="DEBUG", format=LOG_FORMAT, colorize=False)
    logger.add(sys.stderr, level="ERROR", format=LOG_FORMAT, colorize=False)


class StageProgress:
    """The console line of one stage; a daemon thread polls the completed-task count while the stage runs."""

    def __init__(self, name: str, total: int, count_done, stream=None, interval: float = 0.5):
        self.name, self.total, self.count_done, self.interval = name, total, count_done, interval
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.skipped = count_done()  # completed by an earlier run: resumed, not redone
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if self.tty else None

    def line(self, done: int, note: str = "") -> str:
        count = f"{done}/{self.total}"
        text = f"  stage {self.name:<14} {count:>7} tasks {time.monotonic() - self._start:6.1f} s"
        return f"{text}  ({note})" if note else text

    def start(self) -> StageProgress:
        if self._thread:
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.stream.write("\r" + self.line(self.count_done()))
            self.stream.flush()

    def finish(self, failed: bool = False) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        notes = ["failed"] if failed else []
        if self.skipped:
            notes.append(f"resumed: {self.skipped} skipped")
        self.stream.write(("\r" if self.tty else "") + self.line(self.count_done(), ", ".join(notes)) + "\n")
        self.stream.flush()


class QuietLocalExecutor(LocalPipelineExecutor):
    """LocalPipelineExecutor with a quiet console (see the module docstring); same arguments plus the stage's
    name and its parent-process log file."""

    def __init__(self, *args, stage_name: str, stage_log: str | Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_name = stage_name
        self.stage_log = str(stage_log)

    def _completed(self) -> int:
        return self.world_size - len(self.get_incomplete_ranks(skip_completed=True))

    def run(self):
        # the dependency first, so its progress line and log file come before ours (datatrove would run it
        # from inside our run(), under our routing)
        if self.depends is not None and not self.depends._launched:
            self.depends.run()
        Path(self.stage_log).parent.mkdir(parents=True, exist_ok=True)
        progress = StageProgress(self.stage_name, self.world_size, self._completed).start()
        route_loguru(self.stage_log)
        failed = True
        try:
            stats = super().run()
            failed = False
            return stats
        finally:
            setup_default_logger()  # what datatrove's close_task_logger leaves too
            progress.finish(failed=failed)

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        # runs in the pool process (or the parent when workers == 1), which starts with datatrove's stderr sink
        route_loguru(self.stage_log)
        try:
            # local_rank only selects the task's console level in datatrove: non-zero = ERROR only
            return super()._run_for_rank(rank, local_rank + 1, node_rank)
        finally:
            route_loguru(self.stage_log)  # close_task_logger re-added a DEBUG stderr sink
