"""Readers of the curation pipeline: datatrove steps that turn JSONL, Parquet, WARC and plain-text inputs into
``Document`` s, robust to bad input (see ``data_pipeline/CONTRACTS.md`` and ``base.py`` for the accounting).

Usage::

    steps = build_input_steps(InputConfig(kind="jsonl", path="data/web"), rejects_folder="runs/x/rejects")
    LocalPipelineExecutor(pipeline=[*steps, ...], tasks=4, logging_dir="runs/x/logs").run()
"""

from __future__ import annotations

from datatrove.pipeline.base import PipelineStep

from kiln.data_pipeline.readers.base import REJECT_REASONS, RobustReader, list_input_files
from kiln.data_pipeline.readers.config import InputConfig
from kiln.data_pipeline.readers.jsonl import JsonlReader
from kiln.data_pipeline.readers.parquet import ParquetReader
from kiln.data_pipeline.readers.text import TextLinesReader
from kiln.data_pipeline.readers.warc import WarcReader

READERS: dict[str, type[RobustReader]] = {
    "jsonl": JsonlReader,
    "parquet": ParquetReader,
    "warc": WarcReader,
    "text": TextLinesReader,
}


def build_input_steps(cfg: InputConfig, rejects_folder: str, progress: bool = False) -> list[PipelineStep]:
    """The steps that read one input (validated first). They yield the documents they receive, then their own.

    ``rejects_folder``: bad records go to ``{rejects_folder}/{rank:05d}.jsonl``, appended (several inputs of one
    pipeline may share the folder); give a fresh folder per run.
    """
    cfg.validate()
    kwargs = dict(
        path=cfg.path,
        rejects_folder=rejects_folder,
        glob=cfg.glob,
        text_key=cfg.text_key,
        id_key=cfg.id_key,
        url_key=cfg.url_key,
        limit=cfg.limit,
        max_doc_bytes=cfg.max_doc_bytes,
        progress=progress,
    )
    if cfg.kind == "warc":
        return [WarcReader(**kwargs, extraction_timeout_s=cfg.extraction_timeout_s)]
    return [READERS[cfg.kind](**kwargs)]


__all__ = [
    "READERS",
    "REJECT_REASONS",
    "InputConfig",
    "JsonlReader",
    "ParquetReader",
    "RobustReader",
    "TextLinesReader",
    "WarcReader",
    "build_input_steps",
    "list_input_files",
]
