"""Every command in README.md is exercised by a test (issue 12's acceptance).

Each command of README's fenced bash/sh blocks, and each inline `kiln ...` / `torchrun ...` / `python -m ...` /
`pip install ...` / `bash ...` span, is in exactly one of these lists:

* ``RUN``: cheap (help texts, listings, dry-run plans); this file runs it and checks its exit code and output;
* ``MAPPED``: expensive (training, the demo, real curation runs); the named test runs the same command, and this
  file checks that the test function exists and that its source holds the command's distinctive arguments;
* ``NOT_RUNNABLE``: cannot run in CI at all, with the reason;
* ``MENTIONS``: inline spans that name a command in prose rather than ask you to run it.

A README command in no list fails with its text and where to add it; a list entry the README no longer has fails
too, so the lists cannot rot.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kiln.cli import main

from conftest import REPO, SHARED_DATA

README = REPO / "README.md"
TESTS = REPO / "tests"
INLINE_PREFIXES = ("kiln ", "torchrun ", "python -m ", "pip install ", "bash ", ".venv/bin/")


def _normalise(command: str) -> str:
    return " ".join(command.split())


def fenced_commands(text: str) -> list[str]:
    """The commands of the ```bash / ```sh blocks: backslash continuations joined, trailing comments dropped."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(_normalise(line))
    return commands


def inline_commands(text: str) -> list[str]:
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)  # fences, indented ones included
    spans = (_normalise(s) for s in re.findall(r"`([^`]+)`", prose))
    return [s for s in spans if s.startswith(INLINE_PREFIXES)]


# README command -> (the argv this file runs, a substring its output must contain). "{run}" is a small curation
# run and "{sft}" a small SFT build, both made here; a README placeholder (NAME) gets a real value. A command that
# would do real work (a data run, an SFT build) runs as its --dry-run; its real run is MAPPED below or made here.
RUN: dict[str, tuple[list[str], str]] = {
    "kiln --help": (["--help"], "demo"),
    "kiln recipes list": (["recipes", "list"], "pretrain/tiny"),
    "kiln recipes show NAME": (["recipes", "show", "tiny"], "model:"),
    "kiln data train-tokenizer --help": (["data", "train-tokenizer", "--help"], "vocab"),
    "kiln data tokenize --help": (["data", "tokenize", "--help"], "megatron-core indexed datasets"),
    "kiln agent gen --help": (["agent", "gen", "--help"], "--seeds"),
    "kiln train pretrain/tiny": (["train", "pretrain/tiny", "--dry-run"], "per rank"),
    "kiln train recipes/pretrain/llama_1b.yaml --dry-run --world-size 8": (
        ["train", "recipes/pretrain/llama_1b.yaml", "--dry-run", "--world-size", "8"],
        "Nothing was allocated",
    ),
    "kiln train recipes/sft/agentlm-7b-hybrid.yaml --dry-run --world-size 16": (
        ["train", "recipes/sft/agentlm-7b-hybrid.yaml", "--dry-run", "--world-size", "16"],
        "TP2 x PP1 x DP8 = 16 ranks",
    ),
    "kiln data run recipes/data/web.yaml --dry-run": (
        ["data", "run", "recipes/data/web.yaml", "--dry-run"],
        "stage read_filter (4 tasks)",
    ),
    "kiln data run recipes/data/web.yaml executor.tasks=16": (
        ["data", "run", "recipes/data/web.yaml", "executor.tasks=16", "--dry-run"],
        "stage read_filter (16 tasks)",
    ),
    "kiln data stats runs/data/web": (["data", "stats", "{run}"], "report:"),
    "kiln data inspect runs/data/web": (["data", "inspect", "{run}"], "output/"),
    "kiln data inspect runs/data/web/excluded/fineweb --reason line_punct_ratio -n 3": (
        ["data", "inspect", "{run}/excluded/fineweb", "--reason", "line_punct_ratio", "-n", "3"],
        "",
    ),
    "kiln data inspect runs/data/web/rejects/input0": (["data", "inspect", "{run}/rejects/input0"], "malformed_json"),
    "kiln data sft recipes/sft/hybrid_cpu.yaml": (["data", "sft", "recipes/sft/hybrid_cpu.yaml", "--dry-run"], "lima"),
    "kiln data inspect runs/sft/hybrid_cpu/data/train -n 1": (
        ["data", "inspect", "{sft}/train", "-n", "1"],
        "with loss",
    ),
}
# which RUN commands read ../shared/data (skipped, as every such test, when it is absent)
NEEDS_SHARED = {
    "kiln data run recipes/data/web.yaml --dry-run": "web",
    "kiln data run recipes/data/web.yaml executor.tasks=16": "web",
    "kiln data sft recipes/sft/hybrid_cpu.yaml": "chat",
}

# README command -> ("tests/file.py::function", substrings the function's source must contain)
MAPPED: dict[str, tuple[str, list[str]]] = {
    "kiln data run recipes/data/web.yaml": (
        "tests/test_data_run.py::test_web_recipe_end_to_end",
        ['"data", "run", "recipes/data/web.yaml"'],
    ),
    "kiln data run recipes/data/web.yaml --executor ray": (
        "tests/test_data_run.py::test_ray_executor_gives_same_kept_set_as_local",
        ['"data", "run"', '"--executor", "ray"'],
    ),
    "kiln data run recipes/data/web.yaml --executor slurm executor.slurm.partition=cpu": (
        "tests/test_data_run.py::test_slurm_generates_valid_sbatch_chain",
        ['"data", "run"', '"--executor", "slurm", "executor.slurm.partition=cpu"'],
    ),
    "kiln data train-quality --positive good.jsonl --negative bad.jsonl --output quality.bin": (
        "tests/test_filters.py::test_cli_trains_and_prints_metrics",
        ['"train-quality", "--positive"', '"--negative"', '"--output"'],
    ),
    "kiln data inspect runs/demo/data/tokens/demo_meco -n 2 --start 10": (
        "tests/test_tokenize.py::test_cli_train_tokenize_inspect",
        ['run("inspect", f"{out}_meco"', '"-n", "1", "--start", "1"'],
    ),
    "kiln train recipes/sft/hybrid_cpu.yaml": (
        "tests/test_sft_train.py::test_cpu_recipe_runs_at_tiny_scale",
        ['"-m", "kiln", "train", f"recipes/sft/{name}.yaml"', "sorted(CPU_RECIPES)"],
    ),
    "kiln export-hf RUN_DIR/checkpoints/step_XXXXXXX --out runs/sft/hybrid_cpu/hf": (
        "tests/test_sft_export.py::test_sft_checkpoint_exports_its_builds_tokenizer_by_default",
        ['main(["export-hf", str(ckpt), "--out", str(out)])'],
    ),
    "kiln export-hf runs/ckpt --out runs/hf --tokenizer runs/sft/hybrid_cpu/data/tokenizer": (
        "tests/test_sft_export.py::test_exported_tokenizer_renders_the_trained_ids",
        ['"export-hf"', '"--out"', '"--tokenizer", str(sft / "tokenizer")'],
    ),
    "kiln export-hf runs/x/checkpoints/step_0000100 --out hf": (
        "tests/test_sharded_checkpoint.py::test_export_hf_reads_a_sharded_checkpoint_in_one_process",
        ['"-m", "kiln", "export-hf", str(ckpt), "--out"'],
    ),
    "kiln agent eval expert": (
        "tests/test_agent.py::test_cli_eval_baselines_and_offline_metrics",
        ['"agent", "eval", "expert"'],
    ),
    "kiln agent eval random": (
        "tests/test_agent.py::test_cli_eval_baselines_and_offline_metrics",
        ['"agent", "eval", "random"'],
    ),
    "kiln agent eval runs/ckpt": (
        "tests/test_agent.py::test_smollm2_plays_through_the_model_path",
        ['"agent", "eval", "smollm2"'],
    ),
    "kiln import-hf smollm2 --out runs/smollm2": (
        "tests/test_generate.py::test_cli_import_export_generate",
        ['"import-hf"', '"--out"'],
    ),
    "kiln export-hf runs/smollm2 --out runs/smollm2-hf": (
        "tests/test_generate.py::test_cli_import_export_generate",
        ['"export-hf"', '"--out"'],
    ),
    'kiln generate smollm2 --prompt "The capital of France is" --greedy --max-new-tokens 16': (
        "tests/test_generate.py::test_cli_import_export_generate",
        ['"generate"', '"--prompt"', '"--max-new-tokens"'],
    ),
    'kiln generate runs/ckpt --prompt "..." --metadata en.wikipedia.org': (
        "tests/test_generate.py::test_cli_import_export_generate",
        ['"generate"', '"--prompt"', '"--metadata", "en.wikipedia.org"'],
    ),
    "kiln train recipes/pretrain/tiny.yaml": (
        "tests/test_train_resume.py::reference",
        ["_cli(run_dir)"],
    ),
    "torchrun --standalone --nproc-per-node 4 -m kiln train recipes/pretrain/tiny.yaml parallel.tp=2 parallel.pp=2": (
        "tests/test_train_launch.py::test_torchrun_pipeline_run_writes_metrics",
        ['"--standalone", "--nproc-per-node"', '"-m", "kiln", "train", str(TINY)', '"parallel.pp=2"'],
    ),
    "kiln train recipes/pretrain/tiny.yaml checkpoint.interval=5 resume=true": (
        "tests/test_train_resume.py::test_sigkill_then_resume_is_bitwise_exact",
        ['_cli(tmp_path, "resume=true")'],
    ),
    "kiln plot runs/pretrain/tiny": (
        "tests/test_plot.py::test_kiln_plot_command",
        ['main(["plot", str(run)'],
    ),
    "kiln train RECIPE --dry-run --world-size N": (
        "tests/test_recipe_plans.py::test_recipe_dry_run_fits_the_device_at_its_world_size",
        ['"--dry-run", "--world-size", str(world)'],
    ),
    "kiln docs --check": (
        "tests/test_docs.py::test_kiln_docs_writes_the_pages_and_the_picture_and_checks_them",
        ['"docs", "--out"', '"--check"'],
    ),
    "kiln docs": (
        "tests/test_docs.py::test_kiln_docs_writes_the_pages_and_the_picture_and_checks_them",
        ['main(["docs", "--out", str(out)])'],
    ),
    "kiln demo": (
        "tests/test_demo.py::test_demo_console_is_short_and_logs_are_in_the_run_dir",
        ["other = _demo(tmp_path)"],
    ),
    "kiln demo --quick": (
        "tests/test_demo.py::test_demo_console_is_short_and_logs_are_in_the_run_dir",
        ['_demo(tmp_path, "--quick")'],
    ),
    "kiln demo --data DIR": (
        "tests/test_demo.py::test_demo_reads_your_own_text_with_data",
        ['"--data", str(docs)'],
    ),
    "kiln demo --stop-after curate": (
        "tests/test_demo.py::test_demo_reads_your_own_text_with_data",
        ['"--stop-after", "curate"'],
    ),
    "torchrun --standalone --nproc-per-node 4 -m kiln train pretrain/demo": (
        "tests/test_demo.py::test_demo_console_is_short_and_logs_are_in_the_run_dir",
        ['"-m kiln train pretrain/demo" in (run / "logs" / "pretrain.log")'],
    ),
}

NOT_RUNNABLE: dict[str, str] = {
    "bash scripts/setup.sh && .venv/bin/kiln demo": (
        "setup.sh installs torch and the extras from the package index (no network in tests); its `kiln demo` "
        "half is MAPPED as `kiln demo` (tests/test_demo.py)"
    ),
    "bash scripts/test.sh": "it is the CI command itself (setup, ruff, the whole suite): a test cannot run its runner",
    "torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m kiln "
    "train recipes/pretrain/llama_1b.yaml": (
        "two 8-GPU nodes; its plan is checked by test_recipe_plans.py (llama_1b --dry-run at its world size)"
    ),
    'pip install "kilnlm[data]"': (
        "installs from the package index; tests/test_packaging.py installs the built wheel offline and checks the "
        "data steps import without torch"
    ),
    "python -m benchmarks.filters": "a benchmark (minutes, records results in benchmarks/results/), not a test",
    "python -m benchmarks.curation": "a benchmark (minutes, records results in benchmarks/results/), not a test",
    "python -m benchmarks.tokenize": "a benchmark (minutes, records results in benchmarks/results/), not a test",
    "python -m benchmarks.kernels": "a GPU benchmark of the Triton kernels",
    "python -m benchmarks.minhash_stages": "a benchmark (minutes, records results in benchmarks/results/)",
}

# inline spans that name a command (or part of one) in prose; nothing to run as written
MENTIONS: dict[str, str] = {
    "kiln -v ...": "the -v flag, on any command",
    "kiln plot": "a demo stage, by name",
    "kiln agent gen": "a demo stage, by name",
    "kiln data sft sft/demo": "a demo stage (run by tests/test_demo.py)",
    "kiln train sft/demo": "a demo stage (run by tests/test_demo.py)",
    "kiln export-hf": "a demo stage, by name",
    "kiln agent eval": "a command, by name",
    "kiln data": "a section heading",
    "kiln data train-quality": "a command, by name",
    "kiln data tokenize": "a command, by name",
    "kiln data sft": "a command, by name",
    "kiln agent": "a section heading",
    "kiln train": "a command, by name",
    "kiln data run": "a command, by name",
    "python -m pretrain.train": "the former entry point, named as gone",
}


def _kiln(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's --help
        rc = e.code or 0
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _function_source(target: str) -> str | None:
    """The source of a test function (or fixture), its decorators included; None when there is none."""
    path, name = target.split("::")
    lines = (REPO / path).read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return "\n".join(lines[start - 1 : node.end_lineno])
    return None


def test_every_readme_command_is_in_exactly_one_list():
    text = README.read_text()
    fenced, inline = fenced_commands(text), inline_commands(text)
    assert len(fenced) >= 30, f"the README parser found only {len(fenced)} fenced commands"
    lists = {"RUN": RUN, "MAPPED": MAPPED, "NOT_RUNNABLE": NOT_RUNNABLE, "MENTIONS": MENTIONS}
    problems = []
    for command in dict.fromkeys(fenced + inline):
        found = [name for name, entries in lists.items() if command in entries]
        if command in fenced and "MENTIONS" in found:
            problems.append(f"{command!r} is in a fenced block: it must be RUN, MAPPED or NOT_RUNNABLE, not MENTIONS")
        if not found:
            problems.append(
                f"README command {command!r} is exercised by no test: add it to RUN (cheap: run here), MAPPED "
                f"(the test that runs it) or NOT_RUNNABLE (with the reason) in tests/test_readme_commands.py"
            )
        elif len(found) > 1:
            problems.append(f"{command!r} is in several lists: {found}")
    present = set(fenced) | set(inline)
    for name, entries in lists.items():
        for command in entries:
            if command not in present:
                problems.append(f"{name} lists {command!r}, which README.md no longer has: remove or update it")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", sorted(MAPPED))
def test_mapped_test_runs_the_command(command):
    target, needles = MAPPED[command]
    source = _function_source(target)
    assert source is not None, f"{command!r} is mapped to {target}, which does not exist"
    missing = [n for n in needles if n not in source]
    assert not missing, f"{target} no longer holds {missing} of {command!r}: update MAPPED"


def test_not_runnable_entries_say_why():
    assert all(len(reason) > 20 for reason in NOT_RUNNABLE.values())


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A small curation run (the embedded corpus, one malformed record) for the data stats / inspect commands."""
    import orjson
    import yaml

    from kiln.demo_corpus import iter_documents

    root = tmp_path_factory.mktemp("readme_run")
    (root / "in").mkdir()
    docs = [d for d in iter_documents() if len(d["text"]) > 300][:40]
    with open(root / "in" / "part.jsonl", "wb") as f:
        for d in docs:
            f.write(orjson.dumps(d) + b"\n")
        f.write(b'{"id": "broken", "text": "unterminated\n')
    recipe = {
        "name": "readme",
        "output_dir": str(root / "run"),
        "inputs": [{"kind": "jsonl", "path": str(root / "in")}],
        "filters": [{"kind": "fineweb"}],
        "executor": {"kind": "local", "tasks": 1, "workers": 1},
        "progress": False,
        "dedup": {"exact": True, "url": False},
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["data", "run", str(root / "r.yaml")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def small_sft(tmp_path_factory) -> Path:
    """A small SFT build (tests/test_sft_build.py's sources and tiny tokenizer) for `kiln data inspect` of it."""
    from test_sft_build import recipe_file, write_sources

    from kiln.data_pipeline.sft.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("readme_sft")
    recipe = recipe_file(root, str(tiny_tokenizer(root / "tok")), write_sources(root))
    assert main(["data", "sft", recipe, "-q", "data.mix.total_examples=20"]) == 0
    return root / "out"


PLACEHOLDERS = {"{run}": "small_run", "{sft}": "small_sft"}


@pytest.mark.parametrize("command", sorted(RUN))
def test_cheap_command_runs(command, capsys, monkeypatch, request):
    if command in NEEDS_SHARED and not (SHARED_DATA / NEEDS_SHARED[command]).is_dir():
        pytest.skip(f"shared sample data not available: {SHARED_DATA / NEEDS_SHARED[command]}")
    argv, expected = RUN[command]
    for placeholder, fixture in PLACEHOLDERS.items():
        if any(placeholder in a for a in argv):
            folder = str(request.getfixturevalue(fixture))
            argv = [a.replace(placeholder, folder) for a in argv]
            capsys.readouterr()
    monkeypatch.chdir(REPO)  # the README's commands run from the repository root
    rc, output = _kiln(argv, capsys)
    assert rc == 0, f"`{command}` (run as kiln {' '.join(argv)}) exited {rc}:\n{output[-3000:]}"
    assert expected in output, f"`{command}`: {expected!r} not in its output:\n{output[-3000:]}"
