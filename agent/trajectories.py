"""Expert trajectories in ReAct form, written as AgentInstruct-style ShareGPT records.

The expert acts by textworld's walkthrough (the policy commands from the current state). Its thoughts are
built from the game state and the plan, never by a model: where the agent is, which object or exit the next
command concerns, and why (the later walkthrough command that needs it, or that this one completes the goal).

Record (one JSON line per game; `kiln data sft` reads it as ``format: sharegpt`` with no code of its own)::

    {"id": "small-s3", "conversations": [
        {"from": "human", "value": INSTRUCTION, "loss": null},
        {"from": "gpt", "value": "Ok.", "loss": false},
        {"from": "human", "value": "<observation, goal, valid actions>", "loss": null},
        {"from": "gpt", "value": "Thought: ...\\nAction: go east", "loss": true}, ...],
     "meta": {"game": ..., "kind": {...}, "seed": 3, "won": true, "score": 1, "max_score": 1, "steps": 3}}

The record ends on the last action (the game's reply to it is not a turn anything answers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kiln.agent.prompt import OK, conversation_prefix

_TWO = re.compile(r"^(take|put|insert|unlock|lock) (.+?) (from|on|into|with) (.+)$")
_ONE = re.compile(r"^(take|drop|open|close|eat|examine) (.+)$")


def _objects(command: str) -> list[str]:
    m = _TWO.match(command)
    if m:
        return [m.group(2), m.group(4)]
    m = _ONE.match(command)
    return [m.group(2)] if m else []


def _purpose(command: str, plan: list[str]) -> str:
    """Why ``command`` (= plan[0]) is next: the later command it makes possible, or that it ends the task."""
    later = plan[1:]
    if not later:
        return "This should complete the goal."
    if command.startswith("go "):
        target = next((c for c in later if not c.startswith("go ")), None)
        if target is None:
            return "The goal is to get to the right room."
        return f"I need to be where I can {target}."
    for obj in _objects(command):
        need = next((c for c in later if obj in c), None)
        if need is not None:
            return f"I need the {obj} for a later step: {need}."
    return f"That brings me closer to the goal; next I will {later[0]}."


def expert_thought(command: str, plan: list[str], room: str | None, inventory: str) -> str:
    """The thought before ``command``, from the walkthrough ``plan`` (starting with ``command``), the current room
    and the inventory text."""
    where = f"the {room.lower()}" if room else "here"
    carrying = inventory.lower()
    m, one = _TWO.match(command), _ONE.match(command)
    if command.startswith("go "):
        direction = command[3:]
        situation = f"I am in {where}. The way forward is {direction}, so I go {direction}."
    elif m and m.group(1) == "take":
        situation = f"The {m.group(2)} is at the {m.group(4)} in {where}; I take it from there."
    elif m and m.group(1) in ("unlock", "lock"):
        verb, target, tool = m.group(1), m.group(2), m.group(4)
        if tool.lower() in carrying:
            situation = f"I am carrying the {tool}, which fits the {target}; I {verb} the {target} with it."
        else:
            situation = f"The {tool} should fit the {target}; I {verb} the {target} with it."
    elif m and m.group(1) in ("put", "insert"):
        prep = "on" if m.group(1) == "put" else "into"
        situation = (
            f"The goal wants the {m.group(2)} {prep} the {m.group(4)}, which is in {where}; I {m.group(1)} it there."
        )
    elif one and one.group(1) == "take":
        situation = f"I can see the {one.group(2)} in {where}; I pick it up."
    elif one and one.group(1) == "drop":
        situation = f"The {one.group(2)} belongs in {where}; I drop it here."
    elif one and one.group(1) in ("open", "close"):
        situation = f"The {one.group(2)} in {where} has to be {'opened' if one.group(1) == 'open' else 'closed'}; I {one.group(1)} it."
    elif one and one.group(1) == "eat":
        situation = f"I have the {one.group(2)} and the goal is to eat it."
    else:
        situation = f"I am in {where}. The next step toward the goal is to {command}."
    return f"{situation} {_purpose(command, plan)}"


def to_record(episode, record_id: str | None = None) -> dict:
    """An `evaluate.Episode` -> an AgentInstruct-style ShareGPT record."""
    messages = conversation_prefix(episode.observations[: len(episode.responses)], episode.responses[:-1])
    messages.append({"role": "assistant", "content": episode.responses[-1].strip()})
    conversations = []
    for i, m in enumerate(messages):
        if m["role"] == "user":
            conversations.append({"from": "human", "value": m["content"], "loss": None})
        else:
            scaffold = i == 1 and m["content"] == OK
            conversations.append({"from": "gpt", "value": m["content"], "loss": not scaffold})
    return {"id": record_id or episode.game_id, "conversations": conversations, "meta": episode.meta()}


def write_records(records, path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def expert_records(
    refs, max_steps: int = 50, step_timeout: float = 30.0, progress=None
) -> tuple[list[dict], list[str]]:
    """Play every game with the expert: (the records of the games it won, the ids of those it did not; a game
    not won is reported, never written as a demonstration)."""
    from kiln.agent.evaluate import play_episode
    from kiln.agent.policies import ExpertPolicy

    records, failed = [], []
    for i, ref in enumerate(refs):
        episode = play_episode(ref, ExpertPolicy(), max_steps=max_steps, step_timeout=step_timeout)
        if episode.won:
            records.append(to_record(episode))
        else:
            failed.append(ref.game_id)
        if progress is not None:
            progress(i + 1, len(refs), episode)
    return records, failed
