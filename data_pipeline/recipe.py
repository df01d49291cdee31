"""The data recipe: what `kiln data run recipes/data/<name>.yaml` reads.

Stages run in a fixed order (read -> quality filters -> dedup -> metadata -> refine -> write, then optionally
tokenize), each stage a datatrove PipelineStep; the executor block picks local multiprocess (default), Slurm or Ray. Relative paths are resolved against the
directory the command runs in, as datatrove and Megatron do, so recipes in `recipes/data/` are written for
the repository root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

# The config modules, not the packages: loading a recipe should need no datatrove (the packages' step classes
# import it). NOTE: the readers/dedup/refine package __init__s and metadata.py still import datatrove eagerly,
# so today it is imported anyway; see tests/test_config_conventions.py.
from kiln.data_pipeline.dedup.config import DedupConfig
from kiln.data_pipeline.filters.config import FilterConfig
from kiln.data_pipeline.metadata import MetadataConfig
from kiln.data_pipeline.readers.config import InputConfig
from kiln.data_pipeline.refine.config import RefineConfig


@dataclass
class SlurmConfig:
    partition: str | None = None  # sbatch --partition; None: the cluster's default partition
    time: str = "24:00:00"  # sbatch --time: wall-clock limit of each stage's array job
    cpus_per_task: int = 1  # CPUs per task of the job array (one task = one shard of the input)
    mem_per_cpu_gb: float = 2.0  # sbatch --mem-per-cpu, in GB
    qos: str = "normal"  # sbatch --qos
    venv_path: str | None = None  # activated in the sbatch script; default: the running interpreter's venv
    # any other sbatch options, e.g. {account: myproj, constraint: cpu}
    sbatch_args: dict[str, str] = field(default_factory=dict)


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray instance (loopback) unless one is already initialised
    cpus_per_task: int = 1  # CPUs Ray reserves for each task
    mem_per_cpu_gb: float = 2.0  # memory Ray reserves per reserved CPU, in GB


@dataclass
class ExecutorConfig:
    # local: datatrove's multiprocess executor on this machine; slurm: an sbatch job chain; ray: Ray tasks
    kind: Literal["local", "slurm", "ray"] = "local"
    tasks: int = 4  # shards of the input; the kept set depends on it (dedup keeps the first of (rank, index))
    workers: int = -1  # processes at once; -1 = min(tasks, cpu count)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")
        if self.workers == 0 or self.workers < -1:
            raise ValueError(f"workers must be -1 (auto) or >= 1, got {self.workers}")

    @property
    def effective_workers(self) -> int:
        return min(self.tasks, os.cpu_count() or 1) if self.workers == -1 else self.workers


@dataclass
class TokenizeStageConfig:
    """Tokenize the kept documents into megatron-core indexed datasets (`data_pipeline/tokenize`)."""

    tokenizer: str  # a sentencepiece .model, a `kiln data train-tokenizer` folder, or an HF tokenizer folder
    output_prefix: str | None = None  # default: <output_dir>/tokens/<name>
    meco: bool = False  # also write <prefix>_meco / <prefix>_plain (needs the `metadata` stage)
    batch_size: int = 1000  # documents encoded per tokenizer call (sentencepiece encodes a list in one C++ call)
    num_threads: int = 1  # encoding threads per task

    def validate(self) -> None:
        if not os.path.exists(self.tokenizer):
            raise ValueError(
                f"tokenizer {self.tokenizer!r} does not exist (train one with `kiln data train-tokenizer`)"
            )


@dataclass
class DataRecipe:
    name: str  # the run's name: the default tokenized prefix <output_dir>/tokens/<name> and the Slurm job names
    output_dir: str  # the run directory: output/ (kept), excluded/, rejects/, logs/, report/, tokens/
    inputs: list[InputConfig]
    filters: list[FilterConfig] = field(default_factory=list)
    dedup: DedupConfig | None = field(default_factory=DedupConfig)
    metadata: MetadataConfig | None = None  # MeCo: `URL: <host>` prefix per document
    refine: RefineConfig | None = None  # TinyHelen rewriting into simplified language
    tokenize: TokenizeStageConfig | None = None
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    progress: bool = True  # per-task document progress bars

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: at least one input is required")
        names = [step_name(f) for f in self.filters]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"filters: each filter kind may appear once (repeated: {sorted(dupes)})")
        if self.tokenize and self.tokenize.meco and self.metadata is None:
            raise ValueError("tokenize.meco needs a `metadata` stage to derive the prefixes")


def step_name(cfg: object) -> str:
    """Stable, file-system-safe name of a configured step, used for log and excluded-output folders."""
    return str(getattr(cfg, "kind", type(cfg).__name__)).lower()
