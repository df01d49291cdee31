"""The DCLM-style quality classifier as a datatrove filter.

Why not datatrove's ``FastTextClassifierFilter``: it drops without a reason (so accounting cannot say why), it
rewrites ``doc.text`` (joins the kept spans), its metadata keys are raw ``__label__*`` names, it resolves the model
through its download cache, and it does not apply the normalisation our trainer used. This filter scores the
whole document with the same ``normalize_text`` as training, never changes the text, and drops with reason
``low_quality_score``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from kiln.data_pipeline.filters.training import normalize_text, positive_scores


@lru_cache(maxsize=4)
def _load_model(path: str):
    from fasttext.FastText import _FastText  # the class behind load_model, without its stderr warning

    return _FastText(path)


class QualityClassifierFilter(BaseFilter):
    """Scores each document with a fastText quality model; keeps it when P(positive_label) >= threshold."""

    name = "🤖 Quality classifier"

    def __init__(
        self,
        model: str,
        threshold: float = 0.5,
        positive_label: str = "hq",
        metadata_key: str = "quality_score",
        exclusion_writer: DiskWriter | None = None,
        batch_size: int = 64,
    ):
        super().__init__(exclusion_writer, batch_size=batch_size)
        self.model_path = str(model)
        self.threshold = threshold
        self.positive_label = positive_label
        self.metadata_key = metadata_key
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(
                f"quality classifier model not found: {self.model_path} (train one with `kiln data train-quality`)"
            )
        labels = _load_model(self.model_path).labels
        if f"__label__{positive_label}" not in labels:
            raise ValueError(f"positive_label {positive_label!r} is not in {self.model_path} (labels: {labels})")

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        scores = positive_scores(
            _load_model(self.model_path), [normalize_text(doc.text) for doc in batch], self.positive_label
        )
        results: list[bool | tuple[bool, str]] = []
        for doc, score in zip(batch, scores):
            doc.metadata[self.metadata_key] = score
            results.append(True if score >= self.threshold else (False, "low_quality_score"))
        return results

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]
