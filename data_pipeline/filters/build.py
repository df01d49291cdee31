"""Config -> datatrove step. The heuristic rule sets (Gopher quality and repetition, C4, FineWeb) are datatrove's
rules: by default our subclasses in ``heuristics.py``, which decide exactly as datatrove's stock classes but split each
document into words once for all four instead of once per filter through a slow spaCy call path (see that module for
why we do not use datatrove's classes as they are); ``implementation: datatrove`` builds the stock class. Language ID
and the model-based classifier are our own classes (see their modules for why).

Offline by construction: the stock filters split words and sentences with datatrove's per-language tokenizer,
which for English/French/German/... is spaCy's rule-based ``spacy.blank(lang)`` (no trained pipeline, no nltk
punkt download). The filters that would download (datatrove's ``LanguageFilter``, ``C4BadWordsFilter``,
``FastTextClassifierFilter`` with a URL) are not used.
"""

from __future__ import annotations

from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.text import TERMINAL_PUNCTUATION

from kiln.data_pipeline.decontaminate.config import DecontaminateConfig
from kiln.data_pipeline.filters.classifier import QualityClassifierFilter
from kiln.data_pipeline.filters.config import (
    C4QualityConfig,
    FilterConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    QualityClassifierConfig,
)
from kiln.data_pipeline.filters.heuristics import (
    KilnC4QualityFilter,
    KilnFineWebQualityFilter,
    KilnGopherQualityFilter,
    KilnGopherRepetitionFilter,
)
from kiln.data_pipeline.filters.language import OfflineLanguageFilter

# implementation -> class, per heuristic config; both take the same arguments
_CLASSES = {
    GopherQualityConfig: {"kiln": KilnGopherQualityFilter, "datatrove": GopherQualityFilter},
    GopherRepetitionConfig: {"kiln": KilnGopherRepetitionFilter, "datatrove": GopherRepetitionFilter},
    C4QualityConfig: {"kiln": KilnC4QualityFilter, "datatrove": C4QualityFilter},
    FineWebQualityConfig: {"kiln": KilnFineWebQualityFilter, "datatrove": FineWebQualityFilter},
}


def _disabled_as_minus_one(value: int | None) -> int:
    return -1 if value is None else value  # C4QualityFilter's "off" value


def build_filter(cfg: FilterConfig, exclusion_writer: DiskWriter | None = None) -> BaseFilter:
    """The datatrove filter step for one recipe entry. Dropped documents go to ``exclusion_writer`` (if given)
    with ``metadata["filter_reason"]``; each drop is counted as ``dropped`` and ``dropped_<reason>``."""
    if isinstance(cfg, GopherQualityConfig):
        return _CLASSES[GopherQualityConfig][cfg.implementation](
            min_doc_words=cfg.min_doc_words,
            max_doc_words=cfg.max_doc_words,
            min_avg_word_length=cfg.min_avg_word_length,
            max_avg_word_length=cfg.max_avg_word_length,
            max_symbol_word_ratio=cfg.max_symbol_word_ratio,
            max_bullet_lines_ratio=cfg.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=cfg.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=cfg.min_alpha_words_ratio,
            min_stop_words=cfg.min_stop_words,
            stop_words=cfg.stop_words,
            exclusion_writer=exclusion_writer,
            language=cfg.language,
        )
    if isinstance(cfg, GopherRepetitionConfig):
        return _CLASSES[GopherRepetitionConfig][cfg.implementation](
            dup_line_frac=cfg.dup_line_frac,
            dup_para_frac=cfg.dup_para_frac,
            dup_line_char_frac=cfg.dup_line_char_frac,
            dup_para_char_frac=cfg.dup_para_char_frac,
            top_n_grams=tuple(sorted(cfg.top_n_grams.items())),
            dup_n_grams=tuple(sorted(cfg.dup_n_grams.items())),
            exclusion_writer=exclusion_writer,
            language=cfg.language,
        )
    if isinstance(cfg, C4QualityConfig):
        # Modifies doc.text of kept documents (removes lines); see C4QualityConfig.
        return _CLASSES[C4QualityConfig][cfg.implementation](
            exclusion_writer=exclusion_writer,
            split_paragraph=cfg.split_paragraph,
            remove_citations=cfg.remove_citations,
            filter_no_terminal_punct=cfg.filter_no_terminal_punct,
            min_num_sentences=_disabled_as_minus_one(cfg.min_num_sentences),
            min_words_per_line=_disabled_as_minus_one(cfg.min_words_per_line),
            max_word_length=_disabled_as_minus_one(cfg.max_word_length),
            filter_lorem_ipsum=cfg.filter_lorem_ipsum,
            filter_javascript=cfg.filter_javascript,
            filter_curly_bracket=cfg.filter_curly_bracket,
            filter_policy=cfg.filter_policy,
            language=cfg.language,
        )
    if isinstance(cfg, FineWebQualityConfig):
        return _CLASSES[FineWebQualityConfig][cfg.implementation](
            exclusion_writer=exclusion_writer,
            line_punct_thr=cfg.line_punct_thr,
            line_punct_exclude_zero=cfg.line_punct_exclude_zero,
            stop_chars=tuple(cfg.stop_chars) if cfg.stop_chars is not None else tuple(TERMINAL_PUNCTUATION),
            short_line_thr=cfg.short_line_thr,
            short_line_length=cfg.short_line_length,
            char_duplicates_ratio=cfg.char_duplicates_ratio,
            new_line_ratio=cfg.new_line_ratio,
            language=cfg.language,
        )
    if isinstance(cfg, LanguageConfig):
        return OfflineLanguageFilter(
            languages=cfg.languages,
            threshold=cfg.threshold,
            fasttext_model=cfg.fasttext_model,
            label_only=cfg.label_only,
            exclusion_writer=exclusion_writer,
        )
    if isinstance(cfg, DecontaminateConfig):  # a PipelineStep, not a BaseFilter: `split` yields several pieces
        from kiln.data_pipeline.decontaminate.step import build_decontaminate

        return build_decontaminate(cfg, exclusion_writer=exclusion_writer)
    if isinstance(cfg, QualityClassifierConfig):
        return QualityClassifierFilter(
            model=cfg.model,
            threshold=cfg.threshold,
            positive_label=cfg.positive_label,
            metadata_key=cfg.metadata_key,
            exclusion_writer=exclusion_writer,
        )
    raise TypeError(f"build_filter: not a filter config: {type(cfg).__name__}")
