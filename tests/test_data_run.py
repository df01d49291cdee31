"""End-to-end tests of `kiln data run`: accounting, resume after SIGKILL, Ray and Slurm executors."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from kiln.cli import main
from kiln.config import ConfigError
from kiln.data_pipeline.accounting import build_report
from kiln.data_pipeline.runner import iter_output
from kiln.demo_corpus import iter_documents

from conftest import REPO, shared_file

FILTERS = [{"kind": "gopher_repetition"}, {"kind": "fineweb"}]


def write_shards(folder: Path, n_files: int = 6, docs_per_file: int = 120) -> int:
    """Real text from the embedded corpus (installed packages), split over several shards, plus duplicates."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [d for d in iter_documents() if len(d["text"]) > 300][: n_files * docs_per_file]
    docs += [dict(d, id=d["id"] + "#copy") for d in docs[:: max(1, len(docs) // 40)]]  # planted exact duplicates
    for i in range(n_files):
        with open(folder / f"part{i:02d}.jsonl", "wb") as f:
            for d in docs[i::n_files]:
                f.write(orjson.dumps(d) + b"\n")
    return len(docs)


def write_recipe(path: Path, inputs: list[dict], output_dir: Path, tasks: int = 4, **extra) -> Path:
    recipe = {
        "name": "test",
        "output_dir": str(output_dir),
        "inputs": inputs,
        "filters": FILTERS,
        "executor": {"kind": "local", "tasks": tasks, "workers": 2},
        "progress": False,
        # the embedded corpus shares one URL per package: URL dedup would keep one document per package
        "dedup": {"exact": True, "url": False},
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def kept_ids(run_dir: Path) -> list[str]:
    return [r["id"] for r in iter_output(run_dir / "output")]


def test_recipe_typo_fails_before_running(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", [{"kind": "jsonl", "path": str(tmp_path)}], tmp_path / "out")
    data = yaml.safe_load(recipe.read_text())
    data["filterz"] = data.pop("filters")
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"r\.yaml: key 'filterz': unknown key.*Did you mean 'filters'"):
        from kiln.data_pipeline.cli import load_recipe

        load_recipe(str(recipe), [])
    assert main(["data", "run", str(recipe)]) == 2
    assert not (tmp_path / "out").exists()


def test_accounting_adds_up_with_bad_records(tmp_path):
    inp = tmp_path / "in"
    n_good = write_shards(inp, n_files=2, docs_per_file=60)
    with open(inp / "part00.jsonl", "ab") as f:
        f.write(b'{"id": "broken", "text": "unterminated\n')  # malformed JSON
        f.write(b'{"id": "notext", "body": "x"}\n')  # missing text field
        f.write(b'{"id": "bad-utf8", "text": "caf\xe9 ok"}\n')  # invalid UTF-8
        f.write(b'{"id": "empty", "text": "   "}\n')  # empty text
    recipe = write_recipe(tmp_path / "r.yaml", [{"kind": "jsonl", "path": str(inp)}], tmp_path / "run", tasks=2)
    assert main(["data", "run", str(recipe)]) == 0
    report = build_report(tmp_path / "run")
    assert report.input_records == n_good + 4
    assert report.documents_read == n_good
    assert report.rejected == {"malformed_json": 1, "missing_text": 1, "invalid_utf8": 1, "empty_text": 1}
    assert report.kept == len(kept_ids(tmp_path / "run"))
    assert report.kept + report.total_dropped + report.total_rejected == report.input_records
    assert report.dropped["dedup filter"]["exact_duplicate"] >= 1
    # every dropped document is in excluded/, with its reason
    excluded = sum(1 for _ in iter_output(tmp_path / "run" / "excluded" / "dedup"))
    assert excluded == sum(report.dropped["dedup filter"].values())
    rejects = [json.loads(line) for line in open(tmp_path / "run" / "rejects" / "input0" / "00000.jsonl")]
    assert sorted(r["reason"] for r in rejects) == ["empty_text", "invalid_utf8", "malformed_json", "missing_text"]
    assert (tmp_path / "run" / "report" / "stats.png").stat().st_size > 1000

    # `kiln data inspect`: the run's folders with their counts, and the rejects with their reasons
    from kiln.data_pipeline.inspect_output import inspect_path

    overview = inspect_path(tmp_path / "run")
    assert f"output/  {report.kept:,} records" in overview
    assert "rejects/input0/  4 records" in overview
    shown = inspect_path(tmp_path / "run" / "rejects" / "input0", reason="malformed_json")
    assert shown.count("--- ") == 1 and "reason: malformed_json" in shown and "unterminated" in shown


@pytest.mark.slow
@pytest.mark.shared_data
def test_web_recipe_end_to_end(tmp_path):
    shared_file("web/wceb_modern_1000_url_text.jsonl")
    shared_file("web/dolma_sample-0000.warc.gz")
    out = tmp_path / "web"
    cwd = os.getcwd()
    os.chdir(REPO)  # the recipe's relative paths are written for the repository root
    try:
        assert main(["data", "run", "recipes/data/web.yaml", f"output_dir={out}"]) == 0
    finally:
        os.chdir(cwd)
    report = build_report(out)
    assert report.balanced
    assert report.documents_read >= 1000  # the 1000 web pages, plus the WARC pages with extractable text
    assert 0 < report.kept < report.documents_read
    assert report.kept == len(kept_ids(out))
    print(json.dumps(report.to_dict(), indent=1))


def _run_cli(recipe: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "data", "run", str(recipe), *extra],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.mark.slow
def test_resume_after_sigkill_gives_same_output(tmp_path):
    inp = tmp_path / "in"
    write_shards(inp, n_files=8, docs_per_file=60)
    ref = write_recipe(tmp_path / "ref.yaml", [{"kind": "jsonl", "path": str(inp)}], tmp_path / "ref", tasks=8)
    killed = write_recipe(tmp_path / "kill.yaml", [{"kind": "jsonl", "path": str(inp)}], tmp_path / "kill", tasks=8)
    assert _run_cli(ref).wait(timeout=300) == 0

    proc = _run_cli(killed, "executor.workers=1")
    completions = tmp_path / "kill" / "logs" / "read_filter" / "completions"
    deadline = time.time() + 120
    while time.time() < deadline and not (completions.is_dir() and len(list(completions.iterdir())) >= 2):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(completions.iterdir()))
    assert 2 <= done < 8, f"the kill should land mid-way through the first stage ({done}/8 tasks done)"
    assert not (tmp_path / "kill" / "logs" / "dedup_filter" / "completions").exists()

    assert _run_cli(killed).wait(timeout=300) == 0
    assert kept_ids(tmp_path / "kill") == kept_ids(tmp_path / "ref")
    for shard in sorted((tmp_path / "ref" / "output").glob("*.jsonl.gz")):
        again = tmp_path / "kill" / "output" / shard.name
        assert [orjson.loads(x)["text"] for x in gzip.open(shard)] == [
            orjson.loads(x)["text"] for x in gzip.open(again)
        ]
    assert build_report(tmp_path / "kill").to_dict() | {"run_dir": ""} == build_report(tmp_path / "ref").to_dict() | {
        "run_dir": ""
    }


@pytest.mark.slow
def test_ray_executor_gives_same_kept_set_as_local(tmp_path):
    ray = pytest.importorskip("ray")
    inp = tmp_path / "in"
    write_shards(inp, n_files=4, docs_per_file=50)
    local = write_recipe(tmp_path / "local.yaml", [{"kind": "jsonl", "path": str(inp)}], tmp_path / "local")
    assert main(["data", "run", str(local)]) == 0
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        on_ray = write_recipe(tmp_path / "ray.yaml", [{"kind": "jsonl", "path": str(inp)}], tmp_path / "ray")
        assert main(["data", "run", str(on_ray), "--executor", "ray"]) == 0
    finally:
        ray.shutdown()
    assert kept_ids(tmp_path / "ray") == kept_ids(tmp_path / "local")
    assert build_report(tmp_path / "ray").balanced


def test_slurm_generates_valid_sbatch_chain(tmp_path, monkeypatch):
    """No cluster here: a stand-in `sbatch` records each submission; we check the scripts and dependencies."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "sbatch_calls.jsonl"
    (bindir / "sbatch").write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys, pathlib\n"
        f"log = pathlib.Path({str(calls)!r})\n"
        "n = len(log.read_text().splitlines()) if log.exists() else 0\n"
        "args, script = sys.argv[1:-1], open(sys.argv[-1]).read()\n"
        "log.open('a').write(json.dumps({'args': args, 'script': script}) + '\\n')\n"
        "print(f'Submitted batch job {1000 + n}')\n"
    )
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    inp = tmp_path / "in"
    write_shards(inp, n_files=2, docs_per_file=5)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        [{"kind": "jsonl", "path": str(inp)}],
        tmp_path / "run",
        tasks=3,
    )
    assert main(["data", "run", str(recipe), "--executor", "slurm", "executor.slurm.partition=cpu"]) == 0
    submissions = [json.loads(line) for line in calls.read_text().splitlines()]
    jobs = [s for s in submissions if "launch_pickled_pipeline" in s["script"]]
    merges = [s for s in submissions if "merge_stats" in s["script"]]
    stage_names = [p.name for p in sorted((tmp_path / "run" / "logs").iterdir()) if p.name != "slurm"]
    assert len(jobs) == len(stage_names) >= 3 and len(merges) == len(jobs)
    job_ids = [str(1000 + submissions.index(j)) for j in jobs]  # the stand-in numbers submissions from 1000
    for k, job in enumerate(jobs):
        script = job["script"]
        assert script.startswith("#!/bin/bash")
        assert "#SBATCH --partition=cpu" in script
        assert "#SBATCH --cpus-per-task=1" in script
        assert f"source {sys.prefix}/bin/activate" in script
        assert "#SBATCH --array=0-" in script
        pik = script.split("launch_pickled_pipeline ")[1].split()[0]
        assert Path(pik).is_file()
        if k > 0:  # each stage starts only after the previous stage succeeded
            assert f"--dependency=afterok:{job_ids[k - 1]}" in job["args"]
    assert "#SBATCH --array=0-2" in jobs[0]["script"]  # 3 tasks in the first stage


def test_tokenize_cli_and_recipe_stage_write_identical_datasets(tmp_path):
    """`kiln data tokenize` and a recipe's `tokenize:` stage are one runner path: same documents, same bytes."""
    from kiln.data_pipeline.tokenize import TokenizerTrainConfig, train_tokenizer

    inp = tmp_path / "in"
    write_shards(inp, n_files=2, docs_per_file=30)
    tok = train_tokenizer(TokenizerTrainConfig(inputs=[str(inp)], output_dir=str(tmp_path / "tok"), vocab_size=400))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        [{"kind": "jsonl", "path": str(inp)}],
        tmp_path / "run",
        tasks=2,
        metadata={"kind": "url_host"},
        tokenize={"tokenizer": str(tok), "meco": True},
    )
    assert main(["data", "run", str(recipe)]) == 0
    from_recipe = tmp_path / "run" / "tokens" / "test"
    from_cli = tmp_path / "cli" / "test"
    cmd = ["data", "tokenize", str(tmp_path / "run" / "output"), "-t", str(tok), "-o", str(from_cli), "--meco"]
    assert main([*cmd, "--tasks", "2"]) == 0
    for variant in ("_meco", "_plain"):
        for part in ("", "_loss_mask"):
            for ext in (".bin", ".idx"):
                a, b = Path(f"{from_recipe}{variant}{part}{ext}"), Path(f"{from_cli}{variant}{part}{ext}")
                assert a.stat().st_size > 0 and a.read_bytes() == b.read_bytes(), f"{a.name} differs"
