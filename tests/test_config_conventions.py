"""The config-validation convention (kiln/config.py): each ``validate()`` hook raises a plain ValueError about its own
fields, the loader runs every hook exactly once and names the file and key, and loading a recipe imports none of
the heavy runtime packages."""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import pytest

from kiln.config import ConfigError, load_config, validate_tree
from kiln.data_pipeline.dedup.config import DedupConfig, MinhashConfig
from kiln.data_pipeline.recipe import DataRecipe
from kiln.data_pipeline.tokenize.train import TokenizerTrainConfig
from kiln.pretrain.recipe import TrainRecipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "pretrain" / "tiny.yaml"
LLAMA_1B = ROOT / "recipes" / "pretrain" / "llama_1b.yaml"
WEB = ROOT / "recipes" / "data" / "web.yaml"
# web.yaml reads ../shared/data/web relative to the repository root (InputConfig.validate checks the paths exist)
needs_web_inputs = pytest.mark.skipif(
    not (ROOT.parent / "shared" / "data" / "web").is_dir(), reason="recipes/data/web.yaml inputs not present"
)


def _config_classes(cls: type, seen: set[type] | None = None) -> set[type]:
    """Every dataclass reachable from ``cls`` through field annotations (unions, lists, dicts included)."""
    seen = set() if seen is None else seen
    if dataclasses.is_dataclass(cls) and isinstance(cls, type):
        if cls in seen:
            return seen
        seen.add(cls)
        for hint in get_type_hints(cls).values():
            _config_classes(hint, seen)
    elif get_origin(cls) in (Union, types.UnionType, list, tuple, dict) or get_args(cls):
        for arg in get_args(cls):
            _config_classes(arg, seen)
    return seen


def _count_validate_calls(monkeypatch, root: type) -> collections.Counter:
    """Wrap every validate() reachable from ``root``; the counter is keyed by the instance's id."""
    calls: collections.Counter = collections.Counter()
    for cls in _config_classes(root):
        original = cls.__dict__.get("validate")
        if original is None:
            continue

        def counting(self, _original=original):
            calls[id(self)] += 1
            return _original(self)

        monkeypatch.setattr(cls, "validate", counting)
    return calls


def _paths(obj, path: str = "") -> dict[int, str]:
    """id -> key path of every config instance with a validate() hook in a loaded tree."""
    out: dict[int, str] = {}
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            out |= _paths(item, f"{path}[{i}]")
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            out |= _paths(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
        if hasattr(obj, "validate"):
            out[id(obj)] = path
    return out


def _calls_by_path(calls: collections.Counter, tree) -> dict[str, int]:
    paths = _paths(tree)
    assert set(calls) <= set(paths), "validate() ran on an object that is not part of the loaded tree"
    return {paths[i]: calls[i] for i in paths}


PRETRAIN_SECTIONS = ["", "model", "parallel", "optimizer", "schedule", "batch_rampup", "checkpoint", "eval"]


@pytest.mark.parametrize(
    "recipe, expected",
    [
        (TINY, [*PRETRAIN_SECTIONS, "synthetic_data"]),
        (LLAMA_1B, [*PRETRAIN_SECTIONS, "data.datasets[0]", "data.meco", "data"]),
    ],
    ids=["tiny", "llama_1b"],
)
def test_each_pretrain_validator_runs_once(monkeypatch, recipe, expected):
    calls = _count_validate_calls(monkeypatch, TrainRecipe)
    loaded = load_recipe(recipe)
    assert _calls_by_path(calls, loaded) == dict.fromkeys(expected, 1)


@needs_web_inputs
def test_each_data_validator_runs_once(monkeypatch):
    monkeypatch.chdir(ROOT)
    calls = _count_validate_calls(monkeypatch, DataRecipe)
    loaded = load_config(DataRecipe, WEB)
    expected = ["", "inputs[0]", "inputs[1]", *(f"filters[{i}]" for i in range(5)), "dedup.minhash", "dedup"]
    assert _calls_by_path(calls, loaded) == dict.fromkeys([*expected, "executor"], 1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.tp=0", "key 'parallel': tp must be >= 1, got 0"),
        ("model.num_key_value_heads=3", "key 'model': num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
        ("schedule.warmup_steps=20", "top level: schedule.warmup_steps (20) must be < train_steps (20)"),
        ("batch_rampup.start=4", "key 'batch_rampup': increment and ramp_samples must be >= 1 with a ramp (start=4)"),
        ("eval.batches=0", "key 'eval': batches must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_pretrain_errors_name_file_and_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(TINY, [override])
    assert str(e.value).startswith(f"{TINY}: {message}"), str(e.value)


def test_nested_list_item_error_names_its_index():
    with pytest.raises(ConfigError) as e:
        load_recipe(LLAMA_1B, ["data.datasets.0.weight=0"])
    assert str(e.value) == f"{LLAMA_1B}: key 'data.datasets[0]': weight must be a positive number, got 0.0"


@needs_web_inputs
@pytest.mark.parametrize(
    "override, message",
    [
        ("dedup.minhash.buckets=0", "key 'dedup.minhash': buckets must be >= 1, got 0"),
        ("filters.1.dup_line_frac=2", "key 'filters[1]': dup_line_frac must be in [0, 1], got 2.0"),
        ("executor.tasks=0", "key 'executor': tasks must be >= 1, got 0"),
    ],
)
def test_data_errors_name_file_and_key(monkeypatch, override, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        load_config(DataRecipe, WEB, [override])
    assert str(e.value) == f"{WEB}: {message}"


def test_validate_tree_for_configs_built_in_python():
    with pytest.raises(ConfigError) as e:
        validate_tree(DedupConfig(minhash=MinhashConfig(buckets=0)))
    assert str(e.value) == "key 'minhash': buckets must be >= 1, got 0"
    with pytest.raises(ConfigError) as e:
        validate_tree(DedupConfig(exact=False, url=False, minhash=None))
    assert str(e.value) == "DedupConfig: enable at least one of exact, url, minhash"


def test_hooks_raise_plain_value_errors():
    """The loader adds the location; a hook that raised ConfigError itself would be double-prefixed."""
    classes = _config_classes(TrainRecipe) | _config_classes(DataRecipe) | {TokenizerTrainConfig}
    hooks = {cls.__qualname__: cls.__dict__["validate"] for cls in classes if "validate" in cls.__dict__}
    # the scan reaches every hook of the recipe trees (29 when this test was written; more as configs are added;
    # validate_tp takes the TP size: not a hook)
    assert len(hooks) >= 29
    assert [name for name, fn in hooks.items() if "ConfigError" in inspect.getsource(fn)] == []


_PROBE = """
import json, sys, time
t = time.perf_counter()
{load}
elapsed = time.perf_counter() - t
heavy = [m for m in ("torch", "deepspeed", "megatron", "datatrove") if m in sys.modules]
print(json.dumps({{"heavy": heavy, "seconds": elapsed}}))
"""


def _probe(load: str) -> dict:
    """Run ``load`` in a fresh interpreter (from the repository root); which heavy modules it left imported, and its
    wall time without the interpreter's own start-up."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(load=load)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pretrain_recipe_load_imports_no_torch():
    # Measured on the 2-core dev box: 0.06-0.07 s to import kiln.pretrain.recipe, then ~6 ms per recipe (tiny.yaml,
    # llama_1b.yaml); it was ~1.4 s while kiln.pretrain.data, which imports torch, held DataConfig.
    result = _probe(
        "from kiln.pretrain.recipe import load_recipe\n"
        "load_recipe('recipes/pretrain/tiny.yaml')\nload_recipe('recipes/pretrain/llama_1b.yaml')"
    )
    assert result["heavy"] == []


_LOAD_WEB = (
    "from kiln.config import load_config\n"
    "from kiln.data_pipeline.recipe import DataRecipe\n"
    "load_config(DataRecipe, 'recipes/data/web.yaml')"
)


@needs_web_inputs
def test_data_recipe_load_imports_no_torch():
    # Measured: 0.73-0.77 s to import kiln.data_pipeline.recipe (datatrove and its dependencies), then 20-35 ms to
    # load web.yaml (the filters' language check reads datatrove's table instead of importing it).
    assert [m for m in _probe(_LOAD_WEB)["heavy"] if m != "datatrove"] == []
