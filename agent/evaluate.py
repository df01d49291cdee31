"""Agent evaluation: play unseen games with a policy, and offline metrics on held-out trajectories.

Online (`evaluate_games`): every (kind, seed) game is played to a win, a loss, or the step limit. Per episode:
won, score / max score, steps, and per step whether the action was invalid (the reply has no ``Action:`` line,
or its command is not among the admissible commands) and whether it repeats the previous step's command.
Summary, overall and per kind: success rate, mean score (and mean score / max score), invalid-action rate and
repeated-action rate (over all steps), mean steps to win (over won episodes), timeouts. An unparsable reply
costs a step and changes nothing in the game (the next observation says so); a parsed but inadmissible
command is sent to the game, which answers it as it answers any command. A step that exceeds the per-step
timeout ends the episode (not won, counted under ``timeouts``).

Offline (`trajectory_metrics`): for held-out trajectories of any agent source the SFT builder reads, each
trained assistant turn is predicted from the conversation before it: format-parse rate (the reply has an
``Action:`` line) and next-action exact match (lower-cased, whitespace-collapsed) against the reference's action
(over turns whose reference parses).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kiln.agent.env import DEFAULT_STEP_TIMEOUT, StepTimeout, TextWorldEnv
from kiln.agent.prompt import INVALID_FORMAT, conversation_prefix, normalise_action, observation_text, parse_action


@dataclass
class Episode:
    game_id: str
    kind: dict
    seed: int | None
    observations: list[str] = field(default_factory=list)  # the user turns, first one with the goal
    responses: list[str] = field(default_factory=list)  # the policy's replies, one per step
    actions: list[str | None] = field(default_factory=list)  # parsed commands (None: did not parse)
    invalid: list[bool] = field(default_factory=list)
    repeated: list[bool] = field(default_factory=list)
    won: bool = False
    lost: bool = False
    score: int = 0
    max_score: int = 0
    walkthrough_length: int = 0
    timeout: str | None = None
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.responses)

    def meta(self) -> dict:
        return {
            "game": self.game_id,
            "kind": self.kind,
            "seed": self.seed,
            "won": self.won,
            "score": self.score,
            "max_score": self.max_score,
            "steps": self.steps,
        }

    def summary(self) -> dict:
        d = self.meta()
        d.update(
            lost=self.lost,
            invalid=sum(self.invalid),
            repeated=sum(self.repeated),
            unparsed=sum(a is None for a in self.actions),
            walkthrough_length=self.walkthrough_length,
            timeout=self.timeout,
            seconds=round(self.seconds, 3),
            actions=self.actions,
            replies=[r[:300] for r in self.responses],  # what the policy said (cut), to see why it failed
        )
        return d


def play_episode(ref, policy, max_steps: int = 30, step_timeout: float = DEFAULT_STEP_TIMEOUT) -> Episode:
    """One game (a `games.GameRef`) played by ``policy`` for at most ``max_steps`` steps."""
    start = time.perf_counter()
    episode = Episode(ref.game_id, ref.kind_dict(), ref.seed)
    env = TextWorldEnv(ref.path, step_timeout=step_timeout)
    try:
        state = env.reset()
        policy.reset(ref.seed if ref.seed is not None else ref.game_id)
        episode.max_score, episode.walkthrough_length = state.max_score, len(state.walkthrough)
        episode.observations.append(observation_text(state.observation, state.admissible, state.objective))
        previous = None
        for _ in range(max_steps):
            messages = conversation_prefix(episode.observations, episode.responses)
            reply = policy.act(messages, state if policy.needs_state else None)
            action = parse_action(reply)
            episode.responses.append(reply)
            episode.actions.append(action)
            episode.repeated.append(action is not None and action == previous)
            previous = action
            if action is None:
                episode.invalid.append(True)
                next_observation = observation_text(INVALID_FORMAT, state.admissible)
            else:
                episode.invalid.append(action not in state.admissible)
                state = env.step(action)
                episode.score, episode.won, episode.lost = state.score, state.won, state.lost
                if state.done:
                    break
                next_observation = observation_text(state.observation, state.admissible)
            episode.observations.append(next_observation)
    except StepTimeout as e:
        episode.timeout = str(e)
    finally:
        env.close()
    episode.seconds = time.perf_counter() - start
    return episode


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarise(episodes: list[Episode]) -> dict:
    steps = sum(e.steps for e in episodes)
    won = [e for e in episodes if e.won]
    return {
        "episodes": len(episodes),
        "won": len(won),
        "success_rate": _mean(float(e.won) for e in episodes),
        "mean_score": _mean(e.score for e in episodes),
        "mean_normalised_score": _mean(e.score / e.max_score for e in episodes if e.max_score),
        "steps": steps,
        "invalid_action_rate": sum(sum(e.invalid) for e in episodes) / steps if steps else None,
        "unparsed_rate": sum(sum(a is None for a in e.actions) for e in episodes) / steps if steps else None,
        "repeated_action_rate": sum(sum(e.repeated) for e in episodes) / steps if steps else None,
        "mean_steps_to_win": _mean(e.steps for e in won),
        "mean_walkthrough_length": _mean(e.walkthrough_length for e in episodes),
        "timeouts": sum(e.timeout is not None for e in episodes),
    }


def evaluate_games(
    refs, policy, max_steps: int = 30, step_timeout: float = DEFAULT_STEP_TIMEOUT, progress=None
) -> dict:
    """Play every game; the report: summary overall and per kind, and one line per episode."""
    episodes: list[Episode] = []
    start = time.perf_counter()
    for i, ref in enumerate(refs):
        episodes.append(play_episode(ref, policy, max_steps=max_steps, step_timeout=step_timeout))
        if progress is not None:
            progress(i + 1, len(refs), episodes, time.perf_counter() - start)
    kinds = list(dict.fromkeys(e.kind["name"] for e in episodes))
    return {
        "policy": policy.describe(),
        "max_steps": max_steps,
        "step_timeout": step_timeout,
        "summary": summarise(episodes),
        "by_kind": {k: summarise([e for e in episodes if e.kind["name"] == k]) for k in kinds},
        "episodes": [e.summary() for e in episodes],
        "seconds": round(time.perf_counter() - start, 3),
    }


def progress_line(done: int, total: int, episodes: list[Episode], elapsed: float) -> str:
    s = summarise(episodes)
    eta = elapsed / done * (total - done) if done else 0.0
    return (
        f"agent eval: {done}/{total} games | success {s['success_rate']:.3f} | invalid {s['invalid_action_rate'] or 0:.3f}"
        f" | repeated {s['repeated_action_rate'] or 0:.3f} | {elapsed:.1f} s, ETA {eta:.1f} s"
    )


# ------------------------------------------------------------------------------------------------ offline


def trajectory_metrics(paths: list[str], policy, fmt: str = "auto", limit: int | None = None) -> dict:
    """Format-parse rate and next-action exact match of ``policy`` on the trained assistant turns of the
    trajectories in ``paths`` (read with the SFT builder's readers; bad records are counted, not fatal)."""
    from kiln.data_pipeline.sft.messages import BadRecord
    from kiln.data_pipeline.sft.readers import expand_paths, normalise, read_file

    turns = parsed = ref_parsed = matched = bad = records = 0
    for path in expand_paths(paths):
        for _, conv in read_file(path, fmt):
            if isinstance(conv, BadRecord):
                bad += 1
                continue
            conv, _ = normalise(conv)
            records += 1
            history: list[dict] = []
            for m in conv.messages:
                trained = m.train if m.train is not None else m.role == "assistant"
                if m.role == "assistant" and trained and not m.tool_calls:
                    if limit is not None and turns >= limit:
                        break
                    reply = policy.act(list(history), None)
                    turns += 1
                    got, want = parse_action(reply), parse_action(m.content)
                    parsed += got is not None
                    if want is not None:
                        ref_parsed += 1
                        matched += normalise_action(got) == normalise_action(want)
                history.append({"role": m.role, "content": m.content})
            if limit is not None and turns >= limit:
                break
    return {
        "records": records,
        "bad_records": bad,
        "turns": turns,
        "format_parse_rate": parsed / turns if turns else None,
        "reference_parse_rate": ref_parsed / turns if turns else None,
        "next_action_exact_match": matched / ref_parsed if ref_parsed else None,
    }


__all__ = ["Episode", "evaluate_games", "play_episode", "progress_line", "summarise", "trajectory_metrics"]
