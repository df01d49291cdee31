"""Turns a DataRecipe into datatrove executor stages and runs them.

Run directory layout (everything a user may want to look at is a folder of `.jsonl.gz` shards):

    <output_dir>/recipe.yaml          the resolved recipe, overrides applied
    <output_dir>/output/              kept documents
    <output_dir>/excluded/<step>/     dropped documents, with the reason in metadata
    <output_dir>/rejects/input<i>/    malformed input records, with file, line and reason
    <output_dir>/work/                intermediate data (filtered shards, dedup signatures)
    <output_dir>/logs/<stage>/        datatrove logging dirs: per-task logs, stats and completion markers
    <output_dir>/logs/<stage>.log     the parent process's datatrove log lines of a local run (`console`)
    <output_dir>/report/              `kiln data stats` output (table, PNG, HTML, JSON)

Resume: datatrove records a completion marker per task; re-running the same recipe skips completed tasks and
re-runs the others from scratch, overwriting their partial shards, so a killed run ends with the same output
as an uninterrupted one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from kiln.config import to_dict
from kiln.data_pipeline.dedup import DedupFilter, DedupSignatures, find_duplicate_stages
from kiln.data_pipeline.filters import build_filter
from kiln.data_pipeline.readers import build_input_steps
from kiln.data_pipeline.recipe import DataRecipe, ExecutorConfig, TokenizeStageConfig, step_name
from kiln.logs import is_verbose

SHARD_NAME = "${rank}.jsonl.gz"


@dataclass
class Stage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int


class RankShardReader(JsonlReader):
    """Reads exactly the shard that task `rank` of the previous stage wrote (`<rank:05d>.jsonl.gz`).

    datatrove's readers spread the files of a folder over the tasks by position, which shifts when a task wrote
    no file; the dedup filter needs rank r to see rank r's documents in their original order, so we pick the
    file by name instead.
    """

    name = "📖 shard reader"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        filename = f"{rank:05d}.jsonl.gz"
        if self.data_folder.exists(filename):
            yield from self.read_file(filename)


class RunLayout:
    """The folders of a run directory (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.root = Path(output_dir).resolve()
        self.output = self.root / "output"
        self.excluded = self.root / "excluded"
        self.rejects = self.root / "rejects"
        self.work = self.root / "work"
        self.logs = self.root / "logs"
        self.report = self.root / "report"

    def stage_logs(self, stage: str) -> Path:
        return self.logs / stage


def _transform_steps(recipe: DataRecipe) -> list[PipelineStep]:
    """Per-document steps after dedup and before the output is written: metadata, refinement."""
    steps: list[PipelineStep] = []
    if recipe.metadata is not None:
        from kiln.data_pipeline.metadata import AddMetadata

        steps.append(AddMetadata(recipe.metadata))
    if recipe.refine is not None:
        from kiln.data_pipeline.refine import RefineStep

        steps.append(RefineStep(recipe.refine))
    return steps


def tokens_prefix(recipe: DataRecipe) -> str:
    if recipe.tokenize and recipe.tokenize.output_prefix:
        return recipe.tokenize.output_prefix
    return str(RunLayout(recipe.output_dir).root / "tokens" / recipe.name)


def tokenize_stages(
    source: list[PipelineStep], cfg: TokenizeStageConfig, prefix: str, tasks: int, merge: bool = True
) -> list[Stage]:
    """Tokenize the documents `source` yields (task r writes shard r), then merge the shards in rank order.

    The one definition of tokenization as stages: a recipe's `tokenize:` block reads the curation output, and
    `kiln data tokenize` reads arbitrary JSONL; only `source` differs, so both write the same bytes.
    """
    from kiln.data_pipeline.tokenize import MergeIndexedShards, TokenizeToIndexed

    step = TokenizeToIndexed(
        prefix, cfg.tokenizer, meco=cfg.meco, batch_size=cfg.batch_size, num_threads=cfg.num_threads
    )
    stages = [Stage("tokenize", [*source, step], tasks)]
    if merge:
        stages.append(Stage("tokenize_merge", [MergeIndexedShards(prefix)], 1))
    return stages


def _tokenize_stages(recipe: DataRecipe) -> list[Stage]:
    layout = RunLayout(recipe.output_dir)
    source = [RankShardReader(str(layout.output))]
    return tokenize_stages(source, recipe.tokenize, tokens_prefix(recipe), recipe.executor.tasks)


def build_stages(recipe: DataRecipe) -> list[Stage]:
    stages = _curation_stages(recipe)
    if recipe.tokenize is not None:
        stages += _tokenize_stages(recipe)
    return stages


def _curation_stages(recipe: DataRecipe) -> list[Stage]:
    layout = RunLayout(recipe.output_dir)
    tasks = recipe.executor.tasks
    # per-task bars from several processes garble a terminal; a quiet local run shows one line per stage instead
    progress = recipe.progress and (recipe.executor.kind != "local" or is_verbose())
    first: list[PipelineStep] = []
    for i, source in enumerate(recipe.inputs):
        first += build_input_steps(source, str(layout.rejects / f"input{i}"), progress=progress)
    for cfg in recipe.filters:
        writer = JsonlWriter(str(layout.excluded / step_name(cfg)), output_filename=SHARD_NAME)
        first.append(build_filter(cfg, exclusion_writer=writer))
    output = JsonlWriter(str(layout.output), output_filename=SHARD_NAME)
    if recipe.dedup is None:
        return [Stage("read_filter", [*first, *_transform_steps(recipe), output], tasks)]

    dedup_dir = str(layout.work / "dedup")
    filtered_dir = str(layout.work / "filtered")
    first += [DedupSignatures(recipe.dedup, dedup_dir), JsonlWriter(filtered_dir, output_filename=SHARD_NAME)]
    stages = [Stage("read_filter", first, tasks)]
    for i, (pipeline, n) in enumerate(find_duplicate_stages(recipe.dedup, dedup_dir, tasks)):
        stages.append(Stage(f"dedup_{i}", pipeline, n))
    final = [
        RankShardReader(filtered_dir),
        DedupFilter(
            recipe.dedup,
            dedup_dir,
            exclusion_writer=JsonlWriter(str(layout.excluded / "dedup"), output_filename=SHARD_NAME),
        ),
        *_transform_steps(recipe),
        output,
    ]
    stages.append(Stage("dedup_filter", final, tasks))
    return stages


def make_executors(stages: list[Stage], ex: ExecutorConfig, logs_root: Path, job_prefix: str) -> list:
    """One datatrove executor per stage, each depending on the previous one; logs under `logs_root/<stage>/`."""
    executors: list = []
    for stage in stages:
        logs = str(logs_root / stage.name)
        depends = executors[-1] if executors else None
        workers = min(stage.tasks, ex.effective_workers)
        if ex.kind == "local":
            if is_verbose():  # `kiln -v`: datatrove's own console output
                from datatrove.executor import LocalPipelineExecutor

                executor = LocalPipelineExecutor(
                    stage.pipeline, tasks=stage.tasks, workers=workers, logging_dir=logs, depends=depends
                )
            else:
                from kiln.data_pipeline.console import QuietLocalExecutor

                executor = QuietLocalExecutor(
                    stage.pipeline,
                    tasks=stage.tasks,
                    workers=workers,
                    logging_dir=logs,
                    depends=depends,
                    stage_name=stage.name,
                    stage_log=logs_root / f"{stage.name}.log",
                )
        elif ex.kind == "ray":
            from datatrove.executor import RayPipelineExecutor

            executor = RayPipelineExecutor(
                stage.pipeline,
                tasks=stage.tasks,
                workers=workers,
                logging_dir=logs,
                depends=depends,
                cpus_per_task=ex.ray.cpus_per_task,
                mem_per_cpu_gb=ex.ray.mem_per_cpu_gb,
            )
        else:
            from datatrove.executor import SlurmPipelineExecutor

            venv = ex.slurm.venv_path or (sys.prefix if sys.prefix != sys.base_prefix else None)
            executor = SlurmPipelineExecutor(
                stage.pipeline,
                tasks=stage.tasks,
                time=ex.slurm.time,
                partition=ex.slurm.partition or "",
                cpus_per_task=ex.slurm.cpus_per_task,
                mem_per_cpu_gb=ex.slurm.mem_per_cpu_gb,
                qos=ex.slurm.qos,
                job_name=f"{job_prefix}-{stage.name}",
                logging_dir=logs,
                slurm_logs_folder=str(logs_root / "slurm" / stage.name),
                venv_path=f"{venv}/bin/activate" if venv else None,
                sbatch_args=dict(ex.slurm.sbatch_args),
                depends=depends,
                workers=workers if ex.workers != -1 else -1,
            )
        executors.append(executor)
    return executors


def save_recipe(recipe: DataRecipe) -> Path:
    layout = RunLayout(recipe.output_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    path = layout.root / "recipe.yaml"
    path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return path


def _ensure_ray(ex: ExecutorConfig) -> None:
    import ray

    if not ray.is_initialized():
        if ex.ray.address:
            ray.init(address=ex.ray.address)
        else:  # a local single-node cluster on loopback, no dashboard: nothing leaves the machine
            ray.init(include_dashboard=False, num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1")


def run_stages(stages: list[Stage], ex: ExecutorConfig, logs_root: Path, job_prefix: str) -> list:
    """Run (or resume) `stages` in order. Local and Ray block until done; Slurm submits and returns the chain."""
    executors = make_executors(stages, ex, logs_root, job_prefix)
    if ex.kind == "ray":
        _ensure_ray(ex)
    executors[-1].run()  # runs its dependencies first (datatrove's `depends` chain)
    return executors


def run_recipe(recipe: DataRecipe) -> list:
    """Run (or resume) every stage of a recipe, tokenization included."""
    save_recipe(recipe)
    return run_stages(build_stages(recipe), recipe.executor, RunLayout(recipe.output_dir).logs, f"kiln-{recipe.name}")


def run_recipe_tokenize(recipe: DataRecipe) -> list:
    """Only the recipe's tokenize stages, over its finished curation output (the demo trains its tokenizer on
    that output in between, so the curation stages are not re-listed as resumed)."""
    if recipe.tokenize is None:
        raise ValueError(f"recipe {recipe.name} has no tokenize section")
    return run_stages(
        _tokenize_stages(recipe), recipe.executor, RunLayout(recipe.output_dir).logs, f"kiln-{recipe.name}"
    )


def run_tokenize(
    source: list[PipelineStep],
    cfg: TokenizeStageConfig,
    ex: ExecutorConfig,
    work_dir: str | os.PathLike,
    merge: bool = True,
) -> list:
    """`kiln data tokenize`: a recipe's tokenize stages over the documents `source` yields; datatrove's logs and
    completion markers go to `work_dir/logs/`, the datasets to `cfg.output_prefix`."""
    if not cfg.output_prefix:
        raise ValueError("run_tokenize needs cfg.output_prefix")
    stages = tokenize_stages(source, cfg, cfg.output_prefix, ex.tasks, merge=merge)
    return run_stages(stages, ex, Path(work_dir).resolve() / "logs", "kiln-tokenize")


def iter_output(folder: str | os.PathLike) -> Iterator[dict]:
    """Every record of a folder of `.jsonl.gz` shards, in shard order (used by inspect, tests and the demo)."""
    import gzip

    import orjson

    for path in sorted(Path(folder).glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield orjson.loads(line)
