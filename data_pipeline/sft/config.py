"""The ``data`` section of an SFT recipe (``recipes/sft/<name>.yaml``), as typed dataclasses.

`kiln data sft RECIPE` reads the recipe's ``name`` and ``data``; every other top-level section (model, optimizer,
schedule, ...) belongs to `kiln train` and is validated there, so one file describes the whole SFT run.
Overrides address the same keys: ``data.mix.eta=0.5``, ``data.sources.0.weight=2``. Paths are relative to the
working directory (run from the repository root), as in the data recipes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kiln.config import ConfigError, apply_overrides, build_dataclass, read_yaml
from kiln.data_pipeline.sft.readers import expand_paths
from kiln.data_pipeline.sft.templates import TEMPLATE_CHOICES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SourceConfig:
    """One input of the mix.

    role: ``agent`` (trajectories; their share of the mix is ``mix.eta``) or ``general`` (chat).
    paths: files or globs (JSON lines, JSON lists, ``.gz`` allowed).
    format: ``auto`` (detected from each file's first record) or the format the files must be in.
    weight: share inside its role (normalised over the role's sources); None = proportional to the source's
        size (examples or tokens, as ``mix.by``).
    field: ``raw_dialogue`` only: the record field holding the dialogue (default ``chosen``, else ``text``).
    max_records: read at most this many records (quick looks, tests).
    heldout_fraction: overrides ``data.heldout_fraction`` for this source.
    drop_trailing_turns: drop the turns after the last assistant turn (trajectories that end on the
        environment's reply to the final action: FireAct, SWE-agent); counted as ``trimmed`` in the report.
        Without it such rows are ``ends_on_user_turn``.
    """

    name: str  # the source's name in report.json, the per-source held-out split and its loss
    role: Literal["agent", "general"]
    paths: list[str]
    format: Literal["auto", "sharegpt", "openai", "alpaca", "raw_dialogue", "sweagent", "toolbench"] = "auto"
    weight: float | None = None
    field: str | None = None
    max_records: int | None = None
    heldout_fraction: float | None = None
    drop_trailing_turns: bool = False

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '_', '-', '.' (it names output files)")
        if not self.paths:
            raise ValueError("paths is empty: give files or globs")
        if self.weight is not None and self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {self.max_records}")
        if self.heldout_fraction is not None and not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class MixConfig:
    """How many examples of each source the training set holds.

    eta: target share of agent data (AgentTuning: 0.2, the per-example probability of agent data).
    by: what the shares count: ``examples`` (AgentTuning) or ``tokens``.
    total_examples / total_tokens: the size of the mix (at most one). Without either, the general sources are
        used about once: total = general pool / (1 - eta) in ``by`` units (the agent pool once when eta = 1).
    max_repeats: repetition cap: a source is drawn in seeded passes (each a fresh permutation, so an example
        appears at most once per pass) and at most this many passes; a source that runs out stops the mix
        early (shares stay on target, the total falls short, and report.json says which source did it).
    """

    eta: float = 0.2
    by: Literal["examples", "tokens"] = "examples"
    total_examples: int | None = None
    total_tokens: int | None = None
    max_repeats: int = 100

    def validate(self) -> None:
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.total_examples is not None and self.total_tokens is not None:
            raise ValueError("give total_examples or total_tokens, not both")
        for key in ("total_examples", "total_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if self.max_repeats < 1:
            raise ValueError(f"max_repeats must be >= 1, got {self.max_repeats}")


@dataclass
class SFTDataConfig:
    """tokenizer: a tokenizer folder, tokenizer.json, .gguf, model directory or ``smollm2``.
    template: ``auto`` | ``tokenizer`` | ``chatml`` | ``llama2`` | a ``.jinja`` file (see `templates`).
    tool_format: ``auto`` | ``native`` | ``text``: how tool calls reach the template (see `templates`).
    loss: ``assistant`` | ``last_assistant`` | ``all``; per-message flags override it (see `labels`).
    seq_length: the trainer's sequence length; a packed sequence holds ``seq_length + 1`` tokens (inputs and
        the shifted labels), so that is the longest conversation kept.
    too_long: ``truncate`` (cut after the last assistant turn that fits, keeping the scaffold: system prompt,
        task, in-context examples) or ``drop``.
    heldout_fraction: of each source's kept records, held out of training (written per source).
    """

    tokenizer: str
    output_dir: str  # where the build writes the packed data, tokenizer/ and report.json
    sources: list[SourceConfig]
    template: str = "auto"
    tool_format: Literal["auto", "native", "text"] = "auto"
    loss: Literal["assistant", "last_assistant", "all"] = "assistant"
    seq_length: int = 2048
    too_long: Literal["truncate", "drop"] = "truncate"
    heldout_fraction: float = 0.05
    heldout_max: int = 200  # at most this many held-out records per source
    strip_whitespace: bool = True  # strip surrounding whitespace from every message
    mix: MixConfig = field(default_factory=MixConfig)
    seed: int = 0  # seed of the held-out split, the mix's draws and the packing order
    batch_size: int = 256  # conversations rendered and tokenized per batch while reading

    def validate(self) -> None:
        if not self.tokenizer:
            raise ValueError("tokenizer is empty")
        if not self.output_dir:
            raise ValueError("output_dir is empty")
        if not self.sources:
            raise ValueError("sources: at least one source is required")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique, got {names}")
        roles = {s.role for s in self.sources}
        if self.mix.eta > 0 and "agent" not in roles:
            raise ValueError(f"mix.eta is {self.mix.eta} but no source has role 'agent'")
        if self.mix.eta < 1 and "general" not in roles:
            raise ValueError(f"mix.eta is {self.mix.eta} but no source has role 'general' (use eta: 1.0)")
        if self.template not in TEMPLATE_CHOICES:
            path = Path(self.template)
            if path.suffix != ".jinja" or not path.is_file():
                raise ValueError(
                    f"template {self.template!r}: expected one of {list(TEMPLATE_CHOICES)} or an existing .jinja file"
                )
        if self.seq_length < 16:
            raise ValueError(f"seq_length must be >= 16, got {self.seq_length}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.heldout_max < 0:
            raise ValueError(f"heldout_max must be >= 0, got {self.heldout_max}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SFTDataRecipe:
    name: str
    data: SFTDataConfig


def check_source_paths(cfg: SFTDataConfig, source: str) -> None:
    """ConfigError naming ``data.sources[i]`` when a source's paths match no file. Checked when the data is
    about to be built (`kiln data sft`, or `kiln train` building a missing folder), not when a recipe is
    loaded: ``kiln train <sft recipe> --dry-run`` plans a cluster layout where the files need not exist."""
    for i, s in enumerate(cfg.sources):
        if not expand_paths(s.paths):
            raise ConfigError(
                f"{source}: key 'data.sources[{i}]' ({s.name}): no file matches {s.paths} (paths are relative to "
                "the working directory)"
            )


def load_sft_data_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SFTDataRecipe:
    """The ``name`` and ``data`` of an SFT recipe, with ``data.*`` overrides applied, validated."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key != "name" and not key.startswith("data."):
            raise ConfigError(f"override {text!r}: `kiln data sft` takes data.* overrides (e.g. data.mix.eta=0.5)")
    raw = apply_overrides(read_yaml(path), list(overrides))
    if "data" not in raw:
        raise ConfigError(f"{path}: missing required key(s): data (an SFT recipe's data section)")
    picked = {k: raw[k] for k in ("name", "data") if k in raw}
    recipe = build_dataclass(SFTDataRecipe, picked, source=str(path))
    check_source_paths(recipe.data, str(path))
    return recipe
