"""Policies: each answers the conversation of a step (`prompt.conversation_prefix`) with a reply text in the
step format; the caller parses the action out of it (`prompt.parse_action`).

- `ExpertPolicy`: textworld's walkthrough from the current state, with a thought made from the state
  (`trajectories.expert_thought`). The demonstrator of `kiln agent gen` and an upper-bound baseline.
- `RandomPolicy`: a uniformly random admissible command, seeded per game. The lower-bound baseline.
- `ModelPolicy`: a language model (a kiln model directory, an HF directory, a GGUF file or ``smollm2``) loaded
  with `kiln.pretrain.hf_io.load_model`, prompted with the conversation rendered by the SFT builder's chat
  template and tokenized by its tokenizer (so the prompt is the training format token for token), decoded
  with `kiln.pretrain.generate.generate` until the end-of-turn token. Its reply may not parse; that is the
  evaluator's business (an invalid action).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod

from kiln.agent.prompt import parse_action, render_prompt, step_text
from kiln.agent.trajectories import expert_thought

BUILTIN = ("expert", "random")


class Policy(ABC):
    name = "policy"
    needs_state = False  # True: act() reads the game state (only the built-in baselines)

    def reset(self, game_seed: int | str) -> None:  # noqa: B027  (a hook: most policies keep no episode state)
        """Called at the start of every episode."""

    @abstractmethod
    def act(self, messages: list[dict], state) -> str:
        """The reply to the conversation so far (a model's full text; the caller parses its `Action:`)."""

    def describe(self) -> dict:
        return {"name": self.name}


class ExpertPolicy(Policy):
    name = "expert"
    needs_state = True

    def act(self, messages, state) -> str:
        if not state.walkthrough:
            return step_text("I do not know what to do next.", "look")
        command = state.walkthrough[0]
        return step_text(expert_thought(command, state.walkthrough, state.room, state.inventory), command)


class RandomPolicy(Policy):
    name = "random"
    needs_state = True

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.rng = random.Random(seed)

    def reset(self, game_seed: int | str) -> None:
        self.rng = random.Random(f"{self.seed}-{game_seed}")  # per game, independent of the order games run in

    def act(self, messages, state) -> str:
        return step_text("I pick a valid action at random.", self.rng.choice(sorted(state.admissible) or ["look"]))

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed}


class PromptEncoder:
    """A model's tokenizer folder and chat template, as the SFT builder resolves them: conversation -> prompt ids
    (`prompt.render_prompt`, then the builder's tokenization, no special tokens added outside the template)."""

    def __init__(self, source: str, template: str = "auto"):
        from kiln.data_pipeline.sft.templates import resolve_template
        from kiln.data_pipeline.sft.tokenizer_files import ChatTokenizer, resolve_tokenizer_folder

        self.tokenizer = ChatTokenizer(resolve_tokenizer_folder(source))
        self.template = resolve_template(template, self.tokenizer.chat_template)
        self.control = self.tokenizer.control_tokens(self.template.source)

    def prompt_text(self, messages: list[dict]) -> str:
        return render_prompt(messages, self.template, self.tokenizer.special_tokens)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_batch([self.prompt_text(messages)])[0]


class ModelPolicy(Policy):
    name = "model"

    def __init__(
        self,
        source: str,
        template: str = "auto",
        max_new_tokens: int = 96,
        greedy: bool = True,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        import torch

        from kiln.pretrain.hf_io import load_model

        self.torch = torch
        self.source = str(source)
        self.encoder = PromptEncoder(self.source, template)  # before the weights: a bad template fails fast
        self.tokenizer, self.template, self.control = (
            self.encoder.tokenizer,
            self.encoder.template,
            self.encoder.control,
        )
        self.model, self.cfg = load_model(self.source)
        self.model.eval()
        stop = {self.tokenizer.tokenizer.token_to_id(t) for t in self.control}
        if self.cfg.eos_token_id is not None:
            stop |= set(self.cfg.eos_token_id if isinstance(self.cfg.eos_token_id, list) else [self.cfg.eos_token_id])
        self.stop_ids = sorted(i for i in stop if i is not None)
        self.max_new_tokens, self.greedy, self.top_p, self.temperature = max_new_tokens, greedy, top_p, temperature
        self.seed = seed
        self.calls = 0

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encoder.prompt_ids(messages)

    def act(self, messages, state) -> str:
        from kiln.pretrain.generate import generate

        ids = self.torch.tensor([self.prompt_ids(messages)], dtype=self.torch.long)
        out = generate(
            self.model,
            ids,
            self.max_new_tokens,
            greedy=self.greedy,
            top_p=self.top_p,
            temperature=self.temperature,
            eos_token_id=self.stop_ids or None,
            seed=self.seed + self.calls,
        )
        self.calls += 1
        text = self.tokenizer.decode(out[0, ids.shape[1] :].tolist())
        cut = min((at for t in self.control if (at := text.find(t)) >= 0), default=len(text))
        return text[:cut].strip()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "template": self.template.describe(),
            "max_new_tokens": self.max_new_tokens,
            "greedy": self.greedy,
        }


class FixedReplyPolicy(Policy):
    """Always the same reply (tests, and a check that unparsable replies are counted as invalid)."""

    name = "fixed"

    def __init__(self, reply: str):
        self.reply = reply

    def act(self, messages, state) -> str:
        return self.reply


def make_policy(model: str, seed: int = 0, **model_kwargs) -> Policy:
    """``expert``, ``random`` or a model source -> the policy."""
    if model == "expert":
        return ExpertPolicy()
    if model == "random":
        return RandomPolicy(seed)
    return ModelPolicy(model, seed=seed, **model_kwargs)


__all__ = ["BUILTIN", "ExpertPolicy", "FixedReplyPolicy", "ModelPolicy", "Policy", "PromptEncoder", "RandomPolicy",
           "make_policy", "parse_action"]  # fmt: skip
