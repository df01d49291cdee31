"""Recipe config of the decontamination step (``kind: decontaminate`` in a recipe's ``filters:`` list).

Imports no datatrove and no numpy: loading a recipe stays fast. ``validate()`` checks what is cheap (the eval set
files exist, have a known format, are not empty, and their first item has the text field); the step checks every
item when it builds the index, which happens when the pipeline is built, before any task runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kiln.data_pipeline.decontaminate.sources import check_eval_set

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def default_name(path: str) -> str:
    """The name of an eval set without ``name:``: its file name without the suffixes (``mmlu_test.jsonl.gz`` ->
    ``mmlu_test``)."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".txt", ".text"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or Path(path).name


@dataclass
class EvalSetConfig:
    """One evaluation set: a local JSONL (``.jsonl``/``.jsonl.gz``), JSON array, Parquet or text file.

    text_key: the field (JSONL/JSON) or column (Parquet) holding the item's text; ignored for text files, where
        each non-blank line is one item.
    name: the set's name in the report (default: the file name without its suffixes).
    """

    path: str  # the evaluation set's file (JSONL, JSON array, Parquet or text)
    text_key: str = "text"
    name: str | None = None

    @property
    def set_name(self) -> str:
        return self.name if self.name is not None else default_name(self.path)

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path is empty: give the eval set's file")
        if not self.text_key:
            raise ValueError("text_key must not be empty")
        if not _NAME.match(self.set_name):
            raise ValueError(
                f"name {self.set_name!r} must be letters, digits, '_', '.' or '-' (it names the set in the report)"
            )
        check_eval_set(self.path, self.text_key)


@dataclass
class DecontaminateConfig:
    """Remove training text that overlaps evaluation sets (GPT-3 appendix C, MT-NLG section 3.1).

    Every evaluation item and every training document is normalised the same way (``index.normalized_words``:
    Unicode punctuation deleted, lowercased, split on whitespace), and each run of ``ngram`` consecutive words is
    hashed to 64 bits. The eval sets' n-grams form a sorted index; a training document overlaps when one of its
    n-grams is in it.

    policy ``drop``: an overlapping document is dropped with reason ``contaminated``.
    policy ``split`` (GPT-3 / MT-NLG): each overlapping span (from the first character of the n-gram's first word
    token to the last character of its last, punctuation included) plus ``margin_chars`` characters either side
    is cut out, overlapping cuts merge, and the document is split at the cuts. The pieces are the segments left
    that hold a non-whitespace character, exact substrings of the text (not stripped). More than ``max_pieces``
    pieces: the document is dropped (``contaminated_too_many_pieces``); otherwise pieces shorter than
    ``min_piece_chars`` are discarded, and a document with no piece left is dropped (``contaminated``). The kept
    pieces are new documents with ids ``<id>/part<k>`` (k = 0, 1, ... in text order), the parent's metadata plus
    ``metadata["decontaminate"]`` (parent_id, piece, start, end, sets), counted as ``documents_split`` /
    ``pieces_created``. Pieces keep their parent's URL; URL dedup keys a piece by URL and piece number
    (``dedup.signatures.url_key``), so the pieces of one page do not remove each other.

    Eval items with fewer than ``ngram`` words cannot be matched: they are counted (``items_too_short`` in the
    report), not indexed. An eval set with no item at all, or none long enough, is an error.
    """

    kind: Literal["decontaminate"] = "decontaminate"
    # the evaluation sets whose n-grams are removed from the training data
    eval_sets: list[EvalSetConfig] = field(default_factory=list)
    ngram: int = 13  # words per n-gram (GPT-3 / MT-NLG: 13)
    # drop: remove an overlapping document; split: cut the overlaps out (see above)
    policy: Literal["drop", "split"] = "drop"
    margin_chars: int = 200  # split: characters removed either side of an overlapping span
    min_piece_chars: int = 200  # split: shorter pieces are discarded
    max_pieces: int = 10  # split: a document cut into more pieces is dropped

    def validate(self) -> None:
        if not self.eval_sets:
            raise ValueError("eval_sets: give at least one evaluation set ({path, text_key?, name?})")
        names = [s.set_name for s in self.eval_sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval_sets: names must be unique (repeated: {dupes}); set `name:` on each")
        if self.policy not in ("drop", "split"):
            raise ValueError(f"policy must be 'drop' or 'split', got {self.policy!r}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1 (13 in GPT-3 and MT-NLG), got {self.ngram}")
        for name in ("margin_chars", "min_piece_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_pieces < 1:
            raise ValueError(f"max_pieces must be >= 1, got {self.max_pieces}")
