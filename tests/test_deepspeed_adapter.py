"""The DeepSpeed adapter refuses a DeepSpeed version its internals were not checked against, with an error that
names the installed version, the supported range and the pip command; and every private DeepSpeed attribute the
trainer touches is read in that one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kiln.pretrain.engine import deepspeed_adapter
from kiln.pretrain.engine.deepspeed_adapter import SUPPORTED_RANGE, UnsupportedDeepSpeedError, check_deepspeed_version

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["0.19.8", "0.19.9", "0.19.12+cu124", "0.19.8.post1"])
def test_supported_versions_pass(version):
    assert check_deepspeed_version(version) == version


@pytest.mark.parametrize("version", ["0.19.7", "0.18.3", "0.20.0", "0.20.0rc1", "1.0.0"])
def test_unsupported_versions_name_version_range_and_fix(version):
    with pytest.raises(UnsupportedDeepSpeedError) as e:
        check_deepspeed_version(version)
    msg = str(e.value)
    assert f"DeepSpeed {version} is installed" in msg
    assert SUPPORTED_RANGE == ">=0.19.8,<0.20" and SUPPORTED_RANGE in msg
    assert "pip install 'deepspeed>=0.19.8,<0.20'" in msg


def test_the_range_matches_pyproject_and_the_installed_version_passes():
    import deepspeed

    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"deepspeed{SUPPORTED_RANGE}"' in pyproject
    assert check_deepspeed_version() == deepspeed.__version__


def test_train_engine_checks_the_version_first(monkeypatch):
    import deepspeed

    from kiln.pretrain.engine import TrainEngine

    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(UnsupportedDeepSpeedError, match="DeepSpeed 0.21.0 is installed"):
        TrainEngine(None, None)  # fails before it looks at the recipe or the process groups


# DeepSpeed's private attributes and internal layout that kiln touches (attribute access or get/has/setattr)
PRIVATE = {
    "_hp_mapping",
    "single_partition_of_fp32_groups",
    "fp32_groups_flat_partition",
    "fp32_partitioned_groups_flat",
    "grad_position",
    "get_param_id",
    "_get_param_partition_rank",
    "_get_param_partition_group",
    "_get_param_partition_world_size",
    "_hp_optimizer_states_linked",
    "micro_step_id",
    "_step_applied",
    "averaged_gradients",
    "_release_preflattened_grad_buffers",
    "ds_pipe_replicated",
    "ds_tensor",
    "ds_numel",
    "ds_shape",
    "ds_id",
    "partition_numel",
    "get_full_hp_param",
    "_dp_group",
}


def _private_uses(path: Path) -> list[str]:
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            arg = node.args[1] if len(node.args) > 1 else None
            name = arg.value if isinstance(arg, ast.Constant) else None
        if name in PRIVATE:
            uses.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    return uses


def test_private_deepspeed_attributes_are_read_only_in_the_adapter():
    adapter = Path(deepspeed_adapter.__file__).resolve()
    assert _private_uses(adapter)  # the check sees them where they are
    offenders = [
        use
        for folder in ("pretrain", "parallel")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.resolve() != adapter
        for use in _private_uses(path)
    ]
    assert not offenders, "read these through kiln.pretrain.engine.deepspeed_adapter:\n" + "\n".join(offenders)
