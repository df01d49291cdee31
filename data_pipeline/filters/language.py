"""Offline language identification as a datatrove filter.

Why not datatrove's ``LanguageFilter``: its backends (ft176, GlotLID) download their fastText model on first use,
and there is no network here (nor on many clusters). This filter uses py3langid, whose model ships inside the
package, or a fastText LID model the user points to by path (e.g. a local lid.176.bin). It also gives each drop a
reason, where datatrove's returns a bare False.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter


@lru_cache(maxsize=1)
def py3langid_identifier():
    """py3langid's bundled model with calibrated probabilities, loaded once per process (~1 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@lru_cache(maxsize=4)
def _fasttext_model(path: str):
    from fasttext.FastText import _FastText  # the class behind load_model, without its stderr warning

    return _FastText(path)


class OfflineLanguageFilter(BaseFilter):
    """Keeps documents whose language is one of ``languages`` with a score above ``threshold``.

    Writes ``language`` (best label over all languages) and ``language_score`` (its probability) to metadata.
    Drop reasons: ``wrong_language`` (best language not wanted), ``low_language_score`` (no wanted language above
    the threshold although the best one is wanted, or, with ``languages`` empty, the best one is below it).
    """

    name = "🌍 Language ID (offline)"

    def __init__(
        self,
        languages: list[str] | None = ("en",),
        threshold: float = 0.65,
        fasttext_model: str | None = None,
        label_only: bool = False,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.languages = list(languages or [])
        self.threshold = threshold
        self.fasttext_model = str(fasttext_model) if fasttext_model else None
        self.label_only = label_only
        if self.fasttext_model is None:
            labels = set(py3langid_identifier().labels)
        else:
            if not Path(self.fasttext_model).is_file():
                raise FileNotFoundError(f"language filter: fastText model not found: {self.fasttext_model}")
            labels = {lab.removeprefix("__label__") for lab in _fasttext_model(self.fasttext_model).labels}
        unknown = sorted(set(self.languages) - labels)
        if unknown:
            backend = self.fasttext_model or "py3langid"
            raise ValueError(f"language filter: {unknown} not among the {len(labels)} languages of {backend}")

    def scores(self, text: str) -> list[tuple[str, float]]:
        """All languages with their probabilities, best first."""
        if self.fasttext_model is None:
            return py3langid_identifier().rank(text)
        labels, probs = _fasttext_model(self.fasttext_model).predict(" ".join(text.split()), k=-1)
        return [(lab.removeprefix("__label__"), min(1.0, float(p))) for lab, p in zip(labels, probs)]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        ranked = self.scores(doc.text)
        best, best_score = ranked[0] if ranked else ("und", 0.0)
        doc.metadata["language"] = best
        doc.metadata["language_score"] = best_score
        if self.label_only:
            return True
        if not self.languages:
            return True if best_score > self.threshold else (False, "low_language_score")
        wanted = set(self.languages)
        if any(score > self.threshold for lang, score in ranked if lang in wanted):
            return True
        return False, ("low_language_score" if best in wanted else "wrong_language")
