"""Packaging: one top-level import name, recipes shipped inside the wheel, a wheel that installs and runs outside
the checkout, a light `kiln --help`, and our curation steps usable in a plain datatrove pipeline without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the suite runs on 3.11

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HEAVY = ("torch", "deepspeed", "megatron", "ray", "datatrove", "transformers")


def _pip_env() -> dict:
    return dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy: setuptools writes build/ beside the sources, and the checkout stays as it was
    src = tmp_path_factory.mktemp("src") / "kiln"
    shutil.copytree(
        REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__")
    )
    # --no-build-isolation: build with this environment's setuptools (offline, seconds)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_pip_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("kilnlm-*.whl")
    return path


def _mapped_folders() -> dict[str, Path]:
    return {name: REPO / folder for name, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items()}


def test_package_list_covers_every_folder():
    """Every folder holding .py files (and every recipes/ subfolder) is a listed package: none can be left out."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    expected = set()
    for name, folder in _mapped_folders().items():
        for sub in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
            if "__pycache__" in sub.parts:
                continue
            has_files = any(f.suffix == ".py" for f in sub.iterdir()) or (name == "kiln.recipes" and sub != folder)
            if has_files:
                rel = sub.relative_to(folder).parts
                expected.add(".".join([name, *rel]))
    assert listed == expected


def test_wheel_has_one_top_level_name_and_the_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"kiln"}
    # every source file and every recipe of the checkout is in the wheel, under its kiln.* name
    want = set()
    for name, folder in _mapped_folders().items():
        prefix = name.replace(".", "/")
        for f in folder.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix in (".py", ".yaml", ".sh", ".md"):
                want.add(f"{prefix}/{f.relative_to(folder).as_posix()}")
    assert want - set(names) == set()
    assert {"kiln/recipes/pretrain/tiny.yaml", "kiln/recipes/data/demo.yaml"} <= set(names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kiln = kiln.cli:main" in entry


def _run_py(code: str, cwd: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_imports_neither_torch_nor_datatrove(tmp_path):
    code = (
        "import contextlib, io, json, sys\n"
        "from kiln.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        rc = main(['--help'])\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy, 'commands': out.getvalue()}))\n"
    )
    proc = _run_py(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rc"] == 0 and result["heavy"] == []
    for command in ("demo", "recipes", "data", "train", "import-hf", "export-hf", "generate", "plot"):
        assert f"    {command}" in result["commands"]


def test_recipes_list_show_and_unknown_name(capsys):
    from kiln.cli import main

    assert main(["recipes", "list"]) == 0
    listing = capsys.readouterr().out
    assert "pretrain/tiny" in listing and "data/demo" in listing
    assert main(["recipes", "show", "tiny"]) == 0
    assert capsys.readouterr().out == (REPO / "recipes" / "pretrain" / "tiny.yaml").read_text()
    assert main(["recipes", "show", "tinny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: unknown recipe 'tinny'. Known recipes: data/demo, data/web,")
    assert "pretrain/tiny" in err


def test_recipe_argument_resolves_shipped_names_but_never_a_missing_path(tmp_path):
    from kiln.catalog import resolve_recipe_path
    from kiln.config import ConfigError

    tiny = (REPO / "recipes" / "pretrain" / "tiny.yaml").resolve()
    assert resolve_recipe_path("pretrain/tiny").resolve() == tiny
    assert resolve_recipe_path("recipes/pretrain/tiny.yaml").resolve() == tiny
    with pytest.raises(ConfigError, match="recipe file not found"):
        resolve_recipe_path(str(tmp_path / "tiny.yaml"))


def test_missing_extra_names_the_extra():
    from kiln.extras import missing_extra_message

    message = missing_extra_message("train", ModuleNotFoundError("No module named 'deepspeed'", name="deepspeed"))
    assert message == (
        "`kiln train` needs the 'train' extra (module 'deepspeed' is not installed): pip install \"kilnlm[train]\""
    )
    assert missing_extra_message("x", ModuleNotFoundError("nope", name="not_ours")) is None


# A datatrove user's own pipeline with our steps: a filter, the three dedup stages and MeCo metadata, no kiln
# runner, in a fresh interpreter where torch, DeepSpeed, megatron-core and Ray cannot be imported (this venv has
# them; a user's may not): the steps must work and import none of them. The wheel test below also runs the
# curation stages in a venv where they are not installed at all.
DATATROVE_USER = r"""
import importlib.abc, json, sys

class NoTrainStack(importlib.abc.MetaPathFinder):
    # as if torch, DeepSpeed, megatron-core and Ray were not installed (spaCy's thinc tries torch, optionally)
    tried = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "deepspeed", "megatron", "ray"):
            self.tried.append(name)
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, NoTrainStack())
from pathlib import Path
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.writers import JsonlWriter
from kiln.data_pipeline.dedup import DedupConfig, DedupFilter, DedupSignatures, find_duplicate_stages
from kiln.data_pipeline.filters import FineWebQualityConfig, build_filter
from kiln.data_pipeline.metadata import AddMetadata, MetadataConfig

work = Path(sys.argv[1])
text = ("A kiln is a thermally insulated chamber used to harden clay into pottery and bricks.\n"
        "Potters load the ware on shelves, close the door and raise the temperature slowly over many hours.\n"
        "After the firing the kiln is left to cool for a day, so that the pieces do not crack from thermal shock.\n"
        "Wood, gas and electric kilns each give the glaze a different surface and colour.\n")
docs = [
    Document(text=text, id="a", metadata={"url": "https://en.wikipedia.org/wiki/Kiln"}),
    Document(text=text, id="b", metadata={"url": "https://example.org/copy"}),
    Document(text="short\nlines\nonly\nhere", id="c", metadata={"url": "https://example.org/c"}),
]
cfg = DedupConfig(url=False)
def logs(stage):  # one logging dir per stage: datatrove skips ranks its logging dir marks as completed
    return dict(tasks=1, workers=1, logging_dir=str(work / "logs" / stage))
LocalPipelineExecutor([docs, build_filter(FineWebQualityConfig()), DedupSignatures(cfg, str(work / "sig")),
                       JsonlWriter(str(work / "kept1"))], **logs("first")).run()
for pipeline, n in find_duplicate_stages(cfg, str(work / "sig"), 1):
    LocalPipelineExecutor(pipeline, tasks=n, workers=1, logging_dir=str(work / "logs" / pipeline[0].name)).run()
from datatrove.pipeline.readers import JsonlReader
LocalPipelineExecutor([JsonlReader(str(work / "kept1")), DedupFilter(cfg, str(work / "sig")),
                       AddMetadata(MetadataConfig()), JsonlWriter(str(work / "out"))], **logs("last")).run()
rows = [json.loads(l) for f in sorted((work / "out").glob("*.jsonl.gz")) for l in __import__("gzip").open(f, "rt")]
heavy = sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
              & {"torch", "deepspeed", "megatron", "ray"})
print(json.dumps({"ids": [r["id"] for r in rows], "prefix": [r["metadata"].get("meco_prefix") for r in rows],
                  "heavy": heavy}))
"""


def test_our_steps_in_a_plain_datatrove_pipeline_import_no_torch(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", DATATROVE_USER, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"ids": ["a"], "prefix": ["URL: en.wikipedia.org\n\n"], "heavy": []}


@pytest.mark.slow
def test_wheel_installs_with_the_lock_and_runs_outside_the_checkout(wheel, tmp_path):
    """`pip install kilnlm[data]` (the lock's versions) into a fresh venv, then from an empty directory: the help,
    the shipped recipes, the demo's curation stages, and a clear word that training needs the train extra."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, kiln = str(env_dir / "bin" / "python"), str(env_dir / "bin" / "kiln")
    install = [py, "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), f"{wheel}[data]"]
    proc = subprocess.run(install, capture_output=True, text=True, env=_pip_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()

    def kiln_cmd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([kiln, *args], cwd=work, capture_output=True, text=True, timeout=timeout)

    assert kiln_cmd("--help").returncode == 0
    listing = kiln_cmd("recipes", "list")
    assert listing.returncode == 0 and "pretrain/tiny" in listing.stdout
    demo = kiln_cmd("demo", "--stop-after", "curate", "--max-docs", "200", timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "balanced" in demo.stdout and "kiln demo [2/2] curate:" in demo.stdout
    assert any((work / "runs" / "demo" / "data" / "output").glob("*.jsonl.gz"))
    train = kiln_cmd("train", "tiny")
    assert train.returncode == 2
    assert train.stderr.strip() == (
        "kiln: error: `kiln train` needs the 'train' extra (module 'torch' is not installed): "
        'pip install "kilnlm[train]"'
    )
    where = _run_py("import kiln, json; print(kiln.__file__)", work, python=py)
    assert str(env_dir) in where.stdout  # the installed wheel, not the checkout


def test_lazy_tokenize_package_resolves_every_public_name():
    import kiln.data_pipeline.tokenize as tokenize

    assert sorted(tokenize.__all__) == sorted(tokenize._MODULE_OF)
    assert all(getattr(tokenize, name).__name__ == name for name in tokenize.__all__)


def test_help_and_recipes_work_with_only_the_core_installed(tmp_path):
    """Every extra's modules unimportable (as on `pip install kilnlm` with no extra): the command line still
    registers every command, and `kiln train` names the extra it needs."""
    code = (
        "import importlib.abc, sys\n"
        "from kiln.extras import EXTRA_OF_MODULE\n"
        "class NoExtras(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in EXTRA_OF_MODULE:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoExtras())\n"
        "from kiln.cli import main\n"
        "assert main(['recipes', 'list']) == 0\n"
        "assert main(['train', 'tiny']) == 2\n"
        "main(['--help'])\n"
    )
    proc = _run_py(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrain/tiny" in proc.stdout and "    train" in proc.stdout
    assert "`kiln train` needs the 'train' extra" in proc.stderr


def test_kiln_log_records_still_reach_the_root_after_a_command(caplog, capsys):
    """The entry point's logging setup leaves library use alone: records still propagate (caplog, a host
    application's handlers) and the console handler writes to the current stderr."""
    import logging

    from kiln.cli import main

    assert main(["recipes", "list"]) == 0
    with caplog.at_level(logging.WARNING, logger="kiln.pretrain.checkpoint"):
        logging.getLogger("kiln.pretrain.checkpoint").warning("half-written checkpoint skipped")
    assert "half-written checkpoint skipped" in caplog.text
    assert "kiln: warning: half-written checkpoint skipped" in capsys.readouterr().err
