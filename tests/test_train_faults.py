"""A node lost mid-run (issue 9, point 6): two ``torchrun`` launchers (``--nnodes 2``, c10d rendezvous on
127.0.0.1, one rank each: DP2 ZeRO 1 on the tiny recipe), the second one SIGKILLed with its worker as a dead
machine would be, after a checkpoint exists and training went past it.

* The surviving node exits on its own, well within the collective timeout (no hang), non-zero (its rank 75,
  ``kiln.pretrain.faults.EXIT_LOST_CONTACT``; torchrun 1), with one ``kiln: error: lost contact ...`` line that
  names the step, what happened and the checkpoint to resume from.
* Relaunching both launchers with ``resume=true`` continues from that checkpoint: every step's loss and gradient
  norm (those of the killed run before the kill, and the resumed run's after the checkpoint) equal an
  uninterrupted two-launcher run's bitwise, and the resumed run starts at the checkpoint's data position.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.pretrain.testing import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "pretrain" / "tiny.yaml")
STEPS, INTERVAL, TIMEOUT_S = 100, 10, 20
COMMON = [
    f"train_steps={STEPS}",
    "log_interval=1",
    f"checkpoint.interval={INTERVAL}",
    f"parallel.collective_timeout_s={TIMEOUT_S}",
]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


class Node:
    """One launcher (``torchrun`` = a node) of a two-node job; its console goes to files under the run."""

    def __init__(self, index: int, port: int, run_dir: Path, overrides: tuple[str, ...]):
        self.out, self.err = run_dir / f"node{index}.out", run_dir / f"node{index}.err"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0",
            # the first node hosts the rendezvous store, as the machine named by the endpoint would
            "--rdzv-conf", f"is_host={'true' if index == 0 else 'false'}",
            "-m", "kiln", "train", TINY, *COMMON, f"run_dir={run_dir}", *overrides,
        ]  # fmt: skip
        with open(self.out, "a") as out, open(self.err, "a") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err)

    def kill_machine(self) -> None:
        """SIGKILL the launcher and every process under it (torchrun starts its workers in their own sessions,
        so a process-group kill would miss them)."""
        import psutil

        launcher = psutil.Process(self.proc.pid)
        for p in [*launcher.children(recursive=True), launcher]:
            p.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()


def _start_job(run_dir: Path, *overrides: str) -> list[Node]:
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return [Node(i, port, run_dir, overrides) for i in range(2)]


def _finish(nodes: list[Node], timeout: float = 240) -> None:
    for node in nodes:
        try:
            node.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.proc.kill()
            raise AssertionError(f"the job did not finish in {timeout}s:\n{node.text()[-3000:]}") from None
        assert node.proc.returncode == 0, node.text()[-3000:]


def _metrics(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad norm) from metrics.jsonl (a later record of the same step wins: the resumed run's)."""
    path, out = run_dir / "metrics.jsonl", {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # the line the running job is writing
            continue
        if r.get("kind") == "train":
            out[r["step"]] = (r["loss"], r["grad_norm"])
    return out


def _latest_step(checkpoints: Path) -> int | None:
    """The step of the checkpoint ``latest`` names (written only once that checkpoint is complete)."""
    pointer = checkpoints / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return int(name.removeprefix("step_")) if (checkpoints / name).is_dir() else None


def _wait_past_a_checkpoint(nodes: list[Node], run_dir: Path, timeout: float = 240) -> int:
    """Wait until a checkpoint is complete and a later step is logged; return that checkpoint's step."""
    deadline = time.monotonic() + timeout
    while True:
        saved = _latest_step(run_dir / "checkpoints")
        logged = _metrics(run_dir) if saved is not None else {}
        if saved is not None and logged and max(logged) > saved:
            return saved
        for node in nodes:
            if node.proc.poll() is not None:
                raise AssertionError(f"a node ended before the kill:\n{node.text()[-3000:]}")
        if time.monotonic() > deadline:
            for node in nodes:
                node.proc.kill()
            raise AssertionError(f"no checkpoint and later step within {timeout}s")
        time.sleep(0.02)


@pytest.mark.slow
def test_lost_node_fails_fast_with_a_clear_error_and_resumes_exactly(tmp_path):
    from kiln.pretrain.faults import EXIT_LOST_CONTACT

    run = tmp_path / "run"
    nodes = _start_job(run)
    _wait_past_a_checkpoint(nodes, run)
    survivor, lost = nodes
    lost.kill_machine()
    killed = time.monotonic()
    try:
        survivor.proc.wait(timeout=TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        survivor.proc.kill()
        raise AssertionError(f"the surviving node hung:\n{survivor.text()[-3000:]}") from None
    seconds = time.monotonic() - killed
    print(f"the surviving node exited {seconds:.1f}s after the kill")
    console = survivor.text()
    assert survivor.proc.returncode == 1, console[-3000:]  # torchrun's code for a failed worker
    assert seconds < TIMEOUT_S + 15, f"the survivor took {seconds:.1f}s to exit"
    assert f"exitcode  : {EXIT_LOST_CONTACT}" in console  # the worker's, in torchrun's failure report

    done = max(_metrics(run))
    saved = _latest_step(run / "checkpoints")  # after the survivor exited: no more saves can land
    assert saved is not None and INTERVAL <= saved < done < STEPS, (saved, done)  # killed mid-run
    ckpt = run / "checkpoints" / f"step_{saved:07d}"
    errors = [line for line in console.splitlines() if line.startswith("kiln: error: ")]
    assert len(errors) == 1, console[-3000:]
    assert re.fullmatch(
        r"kiln: error: lost contact with another rank during a collective after step (\d+) \(rank \d of 2; "
        r"(connection closed|no answer within the collective timeout of 20 s): .+\) - the job stopped; "
        rf"relaunch with resume=true to continue from the last complete checkpoint {re.escape(str(ckpt))}",
        errors[0],
    ), errors[0]
    assert int(re.search(r"after step (\d+)", errors[0]).group(1)) in (done, done + 1)  # rank 0 logs first
    assert "GLHF" not in console  # gloo's raw error and the worker's traceback went to the log file instead
    logs = "".join(p.read_text() for p in (run / "logs").glob("train_rank*.log"))
    assert errors[0] in logs and "Traceback (most recent call last)" in logs and "GLHF" in logs

    resumed = _start_job(run, "resume=true")
    _finish(resumed)
    text = "".join(n.text() for n in resumed)
    assert f"resumed from {ckpt}" in text
    assert f"step {saved}, {saved * 8} samples consumed" in text  # the checkpoint's data position

    reference = tmp_path / "reference"
    _finish(_start_job(reference))
    ref, got = _metrics(reference), _metrics(run)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # before the kill (the first run) and after the checkpoint (resumed)
        assert got[step] == ref[step], f"step {step} (killed after {done}, resumed at {saved})"


# ------------------------------------------------------------------------------------------------ the message


def _stuck_peer(rank: int, world_size: int) -> str | None:
    """Rank 0's real gloo timeout (rank 1 never joins its all-reduce), classified."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from kiln.parallel.layout import Layout
    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.faults import lost_contact_reason

    ctx = init_parallel(Layout(tp=1, pp=1, dp=2), timeout_s=2)
    dist.barrier()
    reason = None
    if rank == 0:
        try:
            dist.all_reduce(torch.ones(1), group=ctx.dp_group)
        except RuntimeError as e:
            reason = lost_contact_reason(e, timeout_s=2)
    else:
        time.sleep(5)
    destroy_parallel()
    return reason


@pytest.mark.slow
def test_a_collective_timeout_is_reported_as_lost_contact():
    from kiln.pretrain.testing import run_distributed

    reason = run_distributed(_stuck_peer, 2, timeout=120)[0]
    assert reason is not None and reason.startswith("no answer within the collective timeout of 2 s: Timed out"), reason


GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:31123: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application. "
    "Check the logs of the remote worker before reporting an error. GLHF!"
)


def test_collective_faults_turns_a_lost_peer_into_one_line(tmp_path, capsys, monkeypatch):
    from kiln.pretrain.callbacks.base import TrainState
    from kiln.pretrain.faults import EXIT_LOST_CONTACT, collective_faults

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    overrides = [f"run_dir={tmp_path}", "parallel.collective_timeout_s=30"]

    def training(error: BaseException) -> None:
        state = TrainState(step=7)  # what the loop holds when a collective fails
        assert state.step == 7
        raise error

    with collective_faults(TINY, overrides) as fault:
        training(RuntimeError(GLOO_RESET))
    assert fault.exit_code == EXIT_LOST_CONTACT
    err = capsys.readouterr().err
    assert err == (
        "kiln: error: lost contact with another rank during a collective after step 7 (rank 1 of 4; connection "
        "closed: Read error [127.0.0.1]:31123: Connection reset by peer) - the job stopped; relaunch with "
        "resume=true to continue from the last complete checkpoint (none under "
        f"{tmp_path / 'checkpoints'} yet: the run starts over from step 0)\n"
    )
    log = (tmp_path / "logs" / "train_rank1.log").read_text()
    assert err.strip() in log and "GLHF" in log and "Traceback (most recent call last)" in log

    for other in (RuntimeError("CUDA out of memory"), ValueError("bad batch")):  # not a lost peer: unchanged
        with pytest.raises(type(other), match=str(other)):
            with collective_faults(TINY, overrides):
                training(other)
