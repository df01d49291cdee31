"""Stop and save requests (SIGTERM / SIGUSR1 from a scheduler, `Trainer.request_stop`), agreed by every rank.

A signal may reach only some ranks, or reach them during different steps. If one rank left the loop on its own,
the others would wait for it in the next collective until the timeout. So a request is first *pending* on the
rank that got it, and every ``poll_interval`` steps (and at the last step) the ranks all-reduce their pending
flags (MAX): from then on, every rank has the same ``state.should_save`` / ``state.should_stop``, at the same
step. Polling costs one small all-reduce; on a GPU it also waits for the device, hence not every step (a
pre-empted job usually has tens of seconds of grace: ``poll_interval`` steps must fit in them). One process has
nothing to agree on and applies a request at the end of the step it arrived in.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Any

from kiln.pretrain.callbacks.base import TrainState

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """This rank's pending stop/save requests, and the poll that makes every rank agree on them."""

    def __init__(self, ctx: Any, poll_interval: int = 10):
        if poll_interval < 1:
            raise ValueError(f"poll_interval must be >= 1, got {poll_interval}")
        self.ctx = ctx
        self.poll_interval = poll_interval
        self.save = False
        self.stop = False
        self.reason = ""
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def request(self, reason: str, save: bool = True) -> None:
        """Ask the job to stop (and save first, with ``save``) at the next poll."""
        self.stop = True
        self.save = self.save or save
        self.reason = self.reason or reason

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        self.request(f"received {signal.Signals(signum).name}: saving a checkpoint and exiting")

    def install(self, signals: Iterable[int] = PREEMPTION_SIGNALS) -> StopRequests:
        """Turn the signals into requests (the previous handlers come back on `uninstall`)."""
        for s in signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def __enter__(self) -> StopRequests:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def poll(self, state: TrainState, force: bool = False) -> None:
        """At a poll step (every ``poll_interval`` steps, or ``force``), agree on the requests of all ranks and
        set ``state.should_save`` / ``should_stop`` alike on every rank. All ranks must call it at the same
        steps (they do: the step count is the same everywhere)."""
        world = self.ctx.world_size
        if world > 1 and not force and state.step % self.poll_interval:
            return
        save, stop = self.save, self.stop
        if world > 1:
            import torch
            import torch.distributed as dist

            flags = torch.tensor([int(save), int(stop)], device=self.ctx.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            save, stop = (bool(v) for v in flags.tolist())
        if stop and not state.should_stop:
            state.stop_reason = state.stop_reason or self.reason or "stop requested on another rank"
        state.should_save = state.should_save or save
        state.should_stop = state.should_stop or stop
        self.save = self.stop = False


__all__ = ["PREEMPTION_SIGNALS", "StopRequests"]
