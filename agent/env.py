"""A thin wrapper over ``textworld.gym`` for one game: clean observations, the admissible commands, score, won,
the walkthrough from the current state, and a per-step timeout.

Observations lose the z-machine's prompt and status line (``> ... -= Room =-0/3``) and runs of blank lines; the
first observation is the room description (not textworld's ASCII banner). The current room is tracked from the
``-= Room =-`` headers the game prints.

The timeout: every reset and step runs on a worker thread and the caller waits at most ``step_timeout``
seconds; past that `StepTimeout` is raised and the environment is unusable (the interpreter may still be stuck
on that thread, so it is abandoned, never reused). The game file is checked first (`games.check_game_file`):
textworld's interpreter exits the process on a corrupt story file.
"""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from kiln.agent.games import check_game_file

DEFAULT_STEP_TIMEOUT = 30.0
_ROOM = re.compile(r"-= (.+?) =-")
_BLANKS = re.compile(r"\n{3,}")


def _quiet(fn, *args):
    # jericho warns on every TextWorld game that its own score detection is off; textworld reports the score
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not fully supported.*")
        return fn(*args)


class StepTimeout(RuntimeError):
    """An environment reset or step that did not return within the per-step timeout."""


def clean_observation(text: str) -> str:
    lines = [line.rstrip() for line in (text or "").splitlines() if not line.lstrip().startswith(">")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


@dataclass
class State:
    """What the agent and the expert can know after a reset or a step."""

    observation: str
    admissible: list[str]
    walkthrough: list[str]  # textworld's policy commands from here to the win
    objective: str
    room: str | None
    inventory: str
    score: int = 0
    max_score: int = 0
    won: bool = False
    lost: bool = False
    done: bool = False
    moves: int = 0
    extra: dict = field(default_factory=dict)


class TextWorldEnv:
    """One TextWorld game. ``with TextWorldEnv(path) as env: state = env.reset(); state = env.step("go east")``."""

    def __init__(self, game_file: str | os.PathLike, step_timeout: float = DEFAULT_STEP_TIMEOUT):
        self.path = check_game_file(game_file)
        self.step_timeout = float(step_timeout)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textworld-step")
        self._broken: str | None = None
        self._env = None
        self.room: str | None = None

    # ------------------------------------------------------------------------------------------------ plumbing

    def _call(self, what: str, fn, *args):
        if self._broken:
            raise StepTimeout(f"{self.path}: the environment is unusable after a timeout ({self._broken})")
        future = self._pool.submit(_quiet, fn, *args)
        try:
            return future.result(timeout=self.step_timeout)
        except FutureTimeout:
            self._broken = f"{what} took longer than {self.step_timeout:g} s"
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise StepTimeout(f"{self.path}: {self._broken}") from None

    def _open(self):
        import textworld
        import textworld.gym

        infos = textworld.EnvInfos(
            admissible_commands=True,
            policy_commands=True,
            objective=True,
            description=True,
            inventory=True,
            score=True,
            max_score=True,
            won=True,
            lost=True,
            moves=True,
        )
        env_id = textworld.gym.register_game(
            str(self.path), infos, max_episode_steps=1_000_000, asynchronous=False, name=f"kiln-{os.getpid()}"
        )
        return textworld.gym.make(env_id)

    def _state(self, observation: str, info: dict, score=None, done=False) -> State:
        room = _ROOM.findall(observation)
        if room:
            self.room = room[-1]
        return State(
            observation=observation,
            admissible=list(info.get("admissible_commands") or []),
            walkthrough=list(info.get("policy_commands") or []),
            objective=str(info.get("objective") or ""),
            room=self.room,
            inventory=clean_observation(info.get("inventory") or ""),
            score=int(info.get("score") or 0) if score is None else int(score),
            max_score=int(info.get("max_score") or 0),
            won=bool(info.get("won")),
            lost=bool(info.get("lost")),
            done=bool(done or info.get("won") or info.get("lost")),
            moves=int(info.get("moves") or 0),
        )

    # ------------------------------------------------------------------------------------------------ API

    def reset(self) -> State:
        def run():
            if self._env is None:
                self._env = self._open()
            return self._env.reset()

        _, info = self._call("reset", run)
        self.room = None
        return self._state(clean_observation(info.get("description") or ""), info)

    def step(self, command: str) -> State:
        if self._env is None:
            raise RuntimeError("reset() the environment before stepping it")
        raw, score, done, info = self._call(f"step {command!r}", self._env.step, command)
        return self._state(clean_observation(raw), info, score, done)

    def close(self) -> None:
        if self._env is not None and not self._broken:
            try:
                self._call("close", self._env.close)
            except StepTimeout:
                pass
        self._pool.shutdown(wait=not self._broken, cancel_futures=True)
        self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
