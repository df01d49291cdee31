"""Turns a DataRecipe into datatrove executor stages and runs them.

Run directory layout (everything a user may want to look at is a folder of `.jsonl.gz` shards):

    <output_dir>/recipe.yaml          the resolved recipe, overrides applied
    <output_dir>/output/              kept documents
    <output_dir>/excluded/<step>/     dropped documents, with the reason in metadata
    <output_dir>/rejects/input<i>/    malformed input records, with file, line and reason
    <output_dir>/work/                intermediate data (filtered shards, dedup signatures)
    <output_dir>/logs/<stage>/        datatrove logging dirs: per-task stats and completion markers
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
from kiln.data_pipeline.dedup import DedupFilter, DedupSignatures, find_duplicate_stages
from kiln.data_pipeline.filters import build_filter
from kiln.data_pipeline.readers import build_input_steps
from kiln.data_pipeline.recipe import DataRecipe, step_name

from kiln.config import to_dict

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


def _tokenize_stages(recipe: DataRecipe) -> list[Stage]:
    from kiln.data_pipeline.tokenize import MergeIndexedShards, TokenizeToIndexed

    cfg = recipe.tokenize
    layout = RunLayout(recipe.output_dir)
    prefix = tokens_prefix(recipe)
    step = TokenizeToIndexed(
        prefix, cfg.tokenizer, meco=cfg.meco, batch_size=cfg.batch_size, num_threads=cfg.num_threads
    )
    return [
        Stage("tokenize", [RankShardReader(str(layout.output)), step], recipe.executor.tasks),
        Stage("tokenize_merge", [MergeIndexedShards(prefix)], 1),
    ]


def build_stages(recipe: DataRecipe) -> list[Stage]:
    stages = _curation_stages(recipe)
    if recipe.tokenize is not None:
        stages += _tokenize_stages(recipe)
    return stages


def _curation_stages(recipe: DataRecipe) -> list[Stage]:
    layout = RunLayout(recipe.output_dir)
    tasks = recipe.executor.tasks
    first: list[PipelineStep] = []
    for i, source in enumerate(recipe.inputs):
        first += build_input_steps(source, str(layout.rejects / f"input{i}"), progress=recipe.progress)
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


def make_executors(recipe: DataRecipe, stages: list[Stage]) -> list:
    """One datatrove executor per stage, each depending on the previous one."""
    layout = RunLayout(recipe.output_dir)
    ex = recipe.executor
    executors: list = []
    for stage in stages:
        logs = str(layout.stage_logs(stage.name))
        depends = executors[-1] if executors else None
        workers = min(stage.tasks, ex.effective_workers)
        if ex.kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            executor = LocalPipelineExecutor(
                stage.pipeline, tasks=stage.tasks, workers=workers, logging_dir=logs, depends=depends
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
                job_name=f"kiln-{recipe.name}-{stage.name}",
                logging_dir=logs,
                slurm_logs_folder=str(layout.logs / "slurm" / stage.name),
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


def _ensure_ray(recipe: DataRecipe) -> None:
    import ray

    if not ray.is_initialized():
        if recipe.executor.ray.address:
            ray.init(address=recipe.executor.ray.address)
        else:  # a local single-node cluster on loopback, no dashboard: nothing leaves the machine
            ray.init(include_dashboard=False, num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1")


def run_recipe(recipe: DataRecipe) -> list:
    """Run (or resume) every stage. Local and Ray block until done; Slurm submits and returns the job chain."""
    save_recipe(recipe)
    stages = build_stages(recipe)
    executors = make_executors(recipe, stages)
    if recipe.executor.kind == "ray":
        _ensure_ray(recipe)
    executors[-1].run()  # runs its dependencies first (datatrove's `depends` chain)
    return executors


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
