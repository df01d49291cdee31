"""The ReAct step format and the one function that builds the conversation a policy answers.

`conversation_prefix` is used by both sides: `kiln agent gen` writes each expert trajectory as the prefix of
its last step plus the last answer, and `kiln agent eval` prompts the model at step k with the prefix of step k
(rendered with the chat template + generation prompt, tokenized as the SFT builder tokenizes). So the eval
prompt for step k is, token for token, the training conversation up to the answer of step k
(tests/test_agent.py checks it through the SFT builder's own reader, template and labeller).

Conversation layout (AgentInstruct's scaffold)::

    user       INSTRUCTION                          (the task format; loss: null)
    assistant  "Ok."                                (loss: false)
    user       first observation + goal + valid actions
    assistant  "Thought: ...\\nAction: ..."         (loss: true)
    user       next observation + valid actions
    ...
"""

from __future__ import annotations

import re

INSTRUCTION = (
    "You are an agent playing a text adventure game. Each turn you receive an observation of the game and the "
    "list of valid actions. Reply in exactly this format:\n"
    "Thought: <your reasoning about the goal and the current situation>\n"
    "Action: <one command, chosen from the valid actions>\n"
    "Reach the goal in as few actions as possible."
)
OK = "Ok."
INVALID_FORMAT = "Your reply had no 'Action: <command>' line, so nothing happened."

_ACTION = re.compile(r"^[ \t]*Action:[ \t]*(.+?)[ \t]*$", re.MULTILINE)


def observation_text(observation: str, admissible: list[str], objective: str | None = None) -> str:
    """One user turn: what the game said, the goal (first turn only), the valid actions."""
    parts = [observation.strip()]
    if objective:
        parts.append(f"Your goal: {objective.strip()}")
    parts.append("Valid actions: " + ", ".join(admissible))
    return "\n\n".join(p for p in parts if p)


def step_text(thought: str, action: str) -> str:
    """One assistant turn in the step format."""
    return f"Thought: {thought.strip()}\nAction: {action.strip()}"


def parse_action(text: str | None) -> str | None:
    """The command of a reply's first ``Action:`` line (whitespace collapsed), or None if it has none."""
    if not text:
        return None
    m = _ACTION.search(text)
    if not m:
        return None
    action = " ".join(m.group(1).split())
    return action or None


def normalise_action(action: str | None) -> str | None:
    """For exact-match comparisons: lower case, single spaces, no trailing full stop."""
    if action is None:
        return None
    return " ".join(action.lower().rstrip(".").split()) or None


def conversation_prefix(observations: list[str], responses: list[str], instruction: str = INSTRUCTION) -> list[dict]:
    """The messages a policy answers at step ``len(responses)``: the scaffold, then observation/response pairs,
    ending on ``observations[-1]``. Contents are stripped, as the SFT builder strips them."""
    if len(observations) != len(responses) + 1:
        raise ValueError(f"step {len(responses)} needs {len(responses) + 1} observations, got {len(observations)}")
    messages = [{"role": "user", "content": instruction.strip()}, {"role": "assistant", "content": OK}]
    for observation, response in zip(observations, responses):
        messages.append({"role": "user", "content": observation.strip()})
        messages.append({"role": "assistant", "content": response.strip()})
    messages.append({"role": "user", "content": observations[-1].strip()})
    return messages


def render_prompt(messages: list[dict], template, special_tokens: dict[str, str]) -> str:
    """The prompt text: ``template`` (a `kiln.data_pipeline.sft.templates.ChatTemplate`) rendered with the
    generation prompt, exactly as the SFT labeller renders the text before an answer."""
    return template.render(messages, None, special_tokens, add_generation_prompt=True)
