"""A rank that lost contact with the job (a dead or unreachable node) ends with one clear line, not a hang.

What happens on a surviving rank when another node dies mid-run (measured on CPU/gloo with two ``torchrun``
launchers, the second one SIGKILLed with its workers; tests/test_train_faults.py):

* the kernel of the dead machine's peer closes its sockets, so the survivor's next collective fails at once
  with gloo's ``RuntimeError: [.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:PORT: Connection reset
  by peer ... GLHF!``; a machine that vanishes without closing its connections (power loss, network partition)
  leaves the collective waiting until ``parallel.collective_timeout_s`` (every group has it:
  ``kiln.parallel.topology``), then gloo raises ``Timed out waiting ...ms``. NCCL's watchdog raises
  ``DistBackendError`` or aborts the process after the same timeout (that abort cannot be caught here:
  torchrun reports it);
* without this module the rank printed an 80-line traceback and torchrun a ``ChildFailedError`` block, exit code
  1, with nothing about what to do next.

``collective_faults`` (around ``kiln train`` in ``kiln.pretrain.cli``) turns such an error into::

    kiln: error: lost contact with another rank during a collective after step 12 (rank 0 of 2; connection
    closed: Read error [127.0.0.1]:31123: Connection reset by peer) - the job stopped; relaunch with
    resume=true to continue from the last complete checkpoint /runs/x/checkpoints/step_0000010

(one line), appends the full traceback to the rank's log file (``run_dir/logs/train_rank<R>.log``) and exits
with ``EXIT_LOST_CONTACT`` (75, ``EX_TEMPFAIL``: a temporary failure, worth relaunching). Any other error
propagates unchanged.

The step is read from the ``TrainState`` the loop holds (the innermost frame of the traceback with one, as a
local or as ``.state`` of a local such as a trainer object): this module needs no hook in the loop. The last
complete checkpoint is the one ``resume=true`` would pick (``find_latest_checkpoint`` of the recipe's
``checkpoint_dir``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_LOST_CONTACT = 75  # sysexits.h EX_TEMPFAIL

_TIMEOUT = re.compile(r"timed out|timeout|deadline exceeded", re.IGNORECASE)
_CLOSED = re.compile(
    r"connection (?:was )?(?:reset|closed|refused)|closed by peer|broken pipe|got 0 bytes|read error|write error|"
    r"socket closed|no route to host|connection aborted",
    re.IGNORECASE,
)
_COMMS = re.compile(r"gloo|nccl|c10d|processgroup|tcpstore", re.IGNORECASE)
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


def _chain(exc: BaseException):
    """``exc`` and its causes / contexts, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _short(message: str) -> str:
    """gloo's first line without its source location and its boilerplate advice."""
    line = _SOURCE_PREFIX.sub("", message.strip().splitlines()[0] if message.strip() else "")
    line = line.split(". This is typically caused", 1)[0]
    return line[:200].rstrip(" .")


def lost_contact_reason(exc: BaseException, timeout_s: float | None = None) -> str | None:
    """Why this rank lost the job, in a few words, when ``exc`` (or an error it was raised from) is a failed
    collective or store operation: "connection closed: ..." or "no answer within the collective timeout of
    N s: ...". None for any other error."""
    import torch.distributed as dist

    for e in _chain(exc):
        message = str(e)
        is_dist = isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _COMMS.search(message))
        if not is_dist:
            continue
        detail = _short(message)
        if _TIMEOUT.search(message) or isinstance(e, TimeoutError):
            limit = f" of {timeout_s:g} s" if timeout_s else ""
            return f"no answer within the collective timeout{limit}: {detail}"
        if _CLOSED.search(message):
            return f"connection closed: {detail}"
        if isinstance(e, dist.DistError):
            return f"communication error: {detail}"
    return None


def _train_state_in(exc: BaseException):
    """The innermost ``TrainState`` held by a frame of ``exc``'s traceback (a local, or a local's ``.state``)."""
    from kiln.pretrain.callbacks.base import TrainState

    found = None
    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            try:
                state = value if isinstance(value, TrainState) else getattr(value, "state", None)
            except Exception:  # noqa: BLE001 - an object whose attribute lookup fails holds no TrainState
                continue
            if isinstance(state, TrainState):
                found = state
        tb = tb.tb_next
    return found


@dataclass
class RunPlaces:
    """Where a run keeps what the message names: its checkpoints and this rank's log file."""

    checkpoint_dir: Path | None = None
    log_file: Path | None = None
    timeout_s: float | None = None

    @classmethod
    def of(cls, recipe_arg: str, overrides) -> RunPlaces:
        """From the ``kiln train`` arguments (the recipe loads again: it is cheap, and the run may have failed
        before handing anything back). Empty when the recipe itself does not load."""
        from kiln.catalog import resolve_recipe_path
        from kiln.pretrain.recipe import load_recipe

        try:
            recipe = load_recipe(str(resolve_recipe_path(recipe_arg)), list(overrides))
        except Exception:  # noqa: BLE001 - the message then names no checkpoint; the original error is reported
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        return cls(
            checkpoint_dir=Path(recipe.checkpoint_dir),
            log_file=Path(recipe.run_dir) / "logs" / f"train_rank{rank}.log",
            timeout_s=float(recipe.parallel.collective_timeout_s),
        )


def _last_checkpoint(root: Path | None) -> str:
    if root is None:
        return "the last complete checkpoint (checkpoint.dir)"
    from kiln.pretrain.checkpoint import find_latest_checkpoint

    try:
        latest = find_latest_checkpoint(root)
    except OSError as e:
        return f"the last complete checkpoint under {root} (not readable from here: {e})"
    if latest is None:
        return f"the last complete checkpoint (none under {root} yet: the run starts over from step 0)"
    return f"the last complete checkpoint {latest}"


def lost_contact_message(exc: BaseException, places: RunPlaces, reason: str) -> str:
    """The one line (without the ``kiln: error:`` prefix) for a rank that lost the job."""
    state = _train_state_in(exc)
    where = f"after step {state.step}" if state is not None else "at an unknown step"
    rank = os.environ.get("RANK", "0")
    world = os.environ.get("WORLD_SIZE", "1")
    return (
        f"lost contact with another rank during a collective {where} (rank {rank} of {world}; {reason}) - the "
        f"job stopped; relaunch with resume=true to continue from {_last_checkpoint(places.checkpoint_dir)}"
    )


class collective_faults:  # noqa: N801 - used as a context manager, named like one
    """``with collective_faults(recipe_arg, overrides) as fault: return run_command(...)`` then
    ``return fault.exit_code``: a lost peer inside the block is reported (one ``kiln: error:`` line on stderr,
    the traceback in the rank's log file) and suppressed, and ``exit_code`` becomes ``EXIT_LOST_CONTACT``.
    Every other exception propagates."""

    def __init__(self, recipe_arg: str, overrides):
        self.recipe_arg, self.overrides = recipe_arg, list(overrides)
        self.exit_code = 0
        self.message = ""

    def __enter__(self) -> collective_faults:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        places = RunPlaces.of(self.recipe_arg, self.overrides)
        reason = lost_contact_reason(exc, places.timeout_s)
        if reason is None:
            return False
        self.message = lost_contact_message(exc, places, reason)
        self._append_traceback(places.log_file, exc)
        print(f"kiln: error: {self.message}", file=sys.stderr, flush=True)
        self.exit_code = EXIT_LOST_CONTACT
        return True

    def _append_traceback(self, path: Path | None, exc: BaseException) -> None:
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"kiln: error: {self.message}\n")
                f.write("".join(traceback.format_exception(exc)))
        except OSError as e:  # the message on stderr still says what happened
            log.debug("could not append the traceback to %s: %s", path, e)


__all__ = ["EXIT_LOST_CONTACT", "RunPlaces", "collective_faults", "lost_contact_message", "lost_contact_reason"]
