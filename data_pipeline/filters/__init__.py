"""Quality filters of the curation pipeline, as datatrove filters configured from YAML recipes.

Recipe entries (``filters:`` list, one mapping per filter, tagged by ``kind``)::

    filters:
      - kind: language            # offline: py3langid (bundled model) or a local fastText LID model
        languages: [en]
      - kind: gopher_repetition
      - kind: gopher_quality
      - kind: c4                  # NOTE: removes lines from the documents it keeps
        filter_no_terminal_punct: false
      - kind: fineweb
      - kind: quality_classifier  # model from `kiln data train-quality`
        model: models/quality.bin
        threshold: 0.5

``build_filter(cfg, exclusion_writer)`` returns the datatrove step; every drop is counted as ``dropped`` and
``dropped_<reason>``. The four heuristic rule sets are our subclasses of datatrove's filters (``heuristics.py``:
the same decisions, one shared word split per document, ~4.5x faster per core in the web recipe);
``implementation: datatrove`` selects datatrove's own class. ``train_quality_classifier`` trains the DCLM-style
fastText classifier.

The datatrove-backed names (``build_filter`` and the filter classes) are imported on first use, so that importing
the configs (recipe loading, the CLI) does not import datatrove.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.data_pipeline.filters.config import (
    FILTER_CONFIGS,
    C4QualityConfig,
    FilterConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    QualityClassifierConfig,
)
from kiln.data_pipeline.filters.training import normalize_text, read_examples, train_quality_classifier
from kiln.lazy import lazy_getattr

if TYPE_CHECKING:
    from kiln.data_pipeline.filters.build import build_filter
    from kiln.data_pipeline.filters.classifier import QualityClassifierFilter
    from kiln.data_pipeline.filters.language import OfflineLanguageFilter

_LAZY = {
    "build_filter": "kiln.data_pipeline.filters.build",
    "QualityClassifierFilter": "kiln.data_pipeline.filters.classifier",
    "OfflineLanguageFilter": "kiln.data_pipeline.filters.language",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "FILTER_CONFIGS",
    "C4QualityConfig",
    "FilterConfig",
    "FineWebQualityConfig",
    "GopherQualityConfig",
    "GopherRepetitionConfig",
    "LanguageConfig",
    "OfflineLanguageFilter",
    "QualityClassifierConfig",
    "QualityClassifierFilter",
    "build_filter",
    "normalize_text",
    "read_examples",
    "train_quality_classifier",
]
