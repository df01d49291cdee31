"""Decontamination: remove training text that shares word 13-grams with evaluation sets (GPT-3, MT-NLG).

Recipe entry (in the ``filters:`` list; pieces made by ``split`` go through the filters after it and dedup)::

    filters:
      - kind: decontaminate
        eval_sets:                         # JSONL(.gz), JSON array, Parquet or text (one item per line)
          - {path: evals/mmlu_test.jsonl, text_key: question, name: mmlu}
          - {path: evals/lambada.txt}      # name defaults to the file name without suffixes: "lambada"
        ngram: 13
        policy: split                      # drop | split (cut each overlap +-200 chars; <= 10 pieces of >= 200)

Normalisation, hashing and the index's memory bound are documented in ``index.py``; the counts a run reports
(``dropped_contaminated``, ``documents_split``, ``pieces_created``, ``<run>/report/decontamination.json``) in
``step.py`` and ``summary.py``.

The datatrove-backed names (``DecontaminateStep``, ``build_decontaminate``) and the numpy-backed index are imported
on first use, so importing the config (recipe loading) imports neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.data_pipeline.decontaminate.config import DecontaminateConfig, EvalSetConfig
from kiln.lazy import lazy_getattr

if TYPE_CHECKING:
    from kiln.data_pipeline.decontaminate.index import EvalIndex, normalized_words, word_spans
    from kiln.data_pipeline.decontaminate.step import DecontaminateStep, build_decontaminate
    from kiln.data_pipeline.decontaminate.summary import load_summary

_LAZY = {
    "DecontaminateStep": "kiln.data_pipeline.decontaminate.step",
    "build_decontaminate": "kiln.data_pipeline.decontaminate.step",
    "EvalIndex": "kiln.data_pipeline.decontaminate.index",
    "normalized_words": "kiln.data_pipeline.decontaminate.index",
    "word_spans": "kiln.data_pipeline.decontaminate.index",
    "load_summary": "kiln.data_pipeline.decontaminate.summary",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "DecontaminateConfig",
    "DecontaminateStep",
    "EvalIndex",
    "EvalSetConfig",
    "build_decontaminate",
    "load_summary",
    "normalized_words",
    "word_spans",
]
