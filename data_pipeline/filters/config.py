"""Recipe configs of the quality filters: one dataclass per filter ``kind``, defaults from FineWeb / Dolma.

A recipe lists filters as mappings tagged by ``kind``; ``kiln.config`` picks the dataclass from the tag, rejects
unknown keys with a suggestion and runs ``validate()``. This module imports no datatrove, so building and checking a
recipe stays fast; ``build.build_filter`` turns a config into a datatrove step.

Conventions: a threshold set to ``null`` (None) disables that rule. ``language`` of the heuristic filters is the
language whose word tokenizer datatrove uses (spaCy's rule-based ``blank`` tokenizers: offline, nothing downloads).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kiln.data_pipeline.decontaminate.config import DecontaminateConfig

_LANG_CODE = re.compile(r"^[a-z]{2,3}(_[A-Za-z]{4})?$")

# Heuristic filters (gopher_quality, gopher_repetition, c4, fineweb): "kiln" = our classes (filters/heuristics.py:
# datatrove's rules with one shared word split per document, the same decisions, ~4.5x faster per core in the web
# recipe, benchmarks/results/filters.md), "datatrove" = its stock class.
Implementation = Literal["kiln", "datatrove"]


def _check_fraction(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} must be a number in [0, 1], got null")
        return
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_min(name: str, value: float | None, minimum: float, *, nullable: bool = True) -> None:
    if value is not None and value < minimum:
        hint = " (or null to disable)" if nullable else ""
        raise ValueError(f"{name} must be >= {minimum}{hint}, got {value}")


@functools.cache
def _tokenizer_languages() -> frozenset[str]:
    """The language keys datatrove has a word tokenizer for, as ``load_tokenizer_assignments`` derives them from its
    bundled ``assets/tokenizer_assignment.csv``. Read here without importing datatrove (~1 s), which recipe loading
    must not pay; falls back to datatrove's own function if the table is not where it is kept (datatrove 0.x)."""
    spec = importlib.util.find_spec("datatrove")  # a top-level find_spec locates the package without importing it
    roots = (spec.submodule_search_locations or ()) if spec is not None else ()
    table = Path(next(iter(roots), "")) / "assets" / "tokenizer_assignment.csv"
    if not roots or not table.is_file():
        from datatrove.utils.word_tokenizers import load_tokenizer_assignments

        return frozenset(load_tokenizer_assignments())
    keys: set[str] = set()
    with open(table, newline="") as f:
        for row in csv.DictReader(f):
            if not row["type"]:  # no tokenizer class assigned
                continue
            keys.add(f"{row['code_3']}_{row['script']}")
            if row["default_script"]:  # datatrove tests the string ("TRUE"/"FALSE"), so any value counts
                keys.add(row["code_3"])
            if row["code_1"] and row["default_code_1"]:
                keys.add(f"{row['code_1']}_{row['script']}")
                if row["default_script"]:
                    keys.add(row["code_1"])
    return frozenset(keys)


def _check_tokenizer_language(language: str) -> None:
    """The heuristic filters split words with datatrove's per-language tokenizer; fail at config time, not in a
    worker, when datatrove has none for this code."""
    if language not in _tokenizer_languages():
        raise ValueError(
            f"language {language!r} has no word tokenizer in datatrove; use an ISO 639-1/3 code such as 'en' or 'fra'"
        )


@dataclass
class GopherQualityConfig:
    """Gopher quality rules (Rae et al. 2021, table A1), as datatrove's ``GopherQualityFilter`` applies them.

    Drop reasons: gopher_short_doc, gopher_long_doc, gopher_below_avg_threshold, gopher_above_avg_threshold,
    gopher_too_many_hashes, gopher_too_many_ellipsis, gopher_too_many_bullets, gopher_too_many_end_ellipsis,
    gopher_below_alpha_threshold, gopher_enough_stop_words (= too few stop words; datatrove's name).
    """

    kind: Literal["gopher_quality"] = "gopher_quality"
    # "kiln": our class (same decisions, one word split per document); "datatrove": the stock one
    implementation: Implementation = "kiln"
    # Words that are not only punctuation. Not nullable: datatrove's filter divides by the word count, so this
    # rule (>= 1) is what keeps empty documents from crashing it.
    min_doc_words: int = 50
    max_doc_words: int | None = 100_000  # at most this many words (null: no limit)
    min_avg_word_length: float | None = 3  # mean word length at least this many characters
    max_avg_word_length: float | None = 10  # mean word length at most this many characters
    max_symbol_word_ratio: float | None = 0.1  # '#' and '...' per word
    max_bullet_lines_ratio: float | None = 0.9  # max fraction of lines starting with a bullet
    max_ellipsis_lines_ratio: float | None = 0.3  # max fraction of lines ending in an ellipsis
    # Fraction of words that must contain a letter. datatrove calls it `max_non_alpha_words_ratio` (its own TODO
    # says the name is wrong); we use the name that says what it does.
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2  # at least this many of stop_words must occur
    stop_words: list[str] | None = None  # None: Gopher's ["the", "be", "to", "of", "and", "that", "have", "with"]
    language: str = "en"  # language of datatrove's word tokenizer (ISO 639-1/3 code)

    def validate(self) -> None:
        _check_min("min_doc_words", self.min_doc_words, 1, nullable=False)
        for name in ("max_doc_words", "min_stop_words"):
            _check_min(name, getattr(self, name), 0)
        for name in ("min_avg_word_length", "max_avg_word_length"):
            _check_min(name, getattr(self, name), 0)
        if self.max_doc_words and self.min_doc_words > self.max_doc_words:
            raise ValueError(f"min_doc_words ({self.min_doc_words}) > max_doc_words ({self.max_doc_words})")
        if (
            self.min_avg_word_length
            and self.max_avg_word_length
            and self.min_avg_word_length > self.max_avg_word_length
        ):
            raise ValueError(
                f"min_avg_word_length ({self.min_avg_word_length}) > max_avg_word_length ({self.max_avg_word_length})"
            )
        for name in (
            "max_symbol_word_ratio",
            "max_bullet_lines_ratio",
            "max_ellipsis_lines_ratio",
            "min_alpha_words_ratio",
        ):
            _check_fraction(name, getattr(self, name))
        if self.stop_words is not None and not self.stop_words:
            raise ValueError("stop_words must not be empty (use null for Gopher's list, or min_stop_words: null)")
        _check_tokenizer_language(self.language)


@dataclass
class GopherRepetitionConfig:
    """Gopher repetition rules (table A1) via datatrove's ``GopherRepetitionFilter``.

    ``top_n_grams`` / ``dup_n_grams`` map n to the largest allowed fraction of characters (YAML: ``{2: 0.2}``).
    Drop reasons: empty, dup_para_frac, dup_para_char_frac, dup_line_frac, dup_line_char_frac, top_<n>_gram,
    duplicated_<n>_n_grams.
    """

    kind: Literal["gopher_repetition"] = "gopher_repetition"
    # "kiln": our class (same decisions, one word split per document); "datatrove": the stock one
    implementation: Implementation = "kiln"
    dup_line_frac: float | None = 0.3  # max fraction of lines that duplicate another line
    dup_para_frac: float | None = 0.3  # max fraction of paragraphs that duplicate another paragraph
    dup_line_char_frac: float | None = 0.2  # max fraction of characters in duplicated lines
    dup_para_char_frac: float | None = 0.2  # max fraction of characters in duplicated paragraphs
    # n -> max fraction of characters covered by the most frequent n-gram
    top_n_grams: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    # n -> max fraction of characters in n-grams that occur more than once
    dup_n_grams: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    language: str = "en"  # language of datatrove's word tokenizer (ISO 639-1/3 code)

    def validate(self) -> None:
        for name in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
            _check_fraction(name, getattr(self, name))
        for name in ("top_n_grams", "dup_n_grams"):
            for n, frac in getattr(self, name).items():
                if n < 1:
                    raise ValueError(f"{name}: n-gram size must be >= 1, got {n}")
                _check_fraction(f"{name}[{n}]", frac, allow_none=False)
        _check_tokenizer_language(self.language)


@dataclass
class C4QualityConfig:
    """C4 rules (Raffel et al. 2020) via datatrove's ``C4QualityFilter``.

    NOTE: this filter MODIFIES the text of the documents it keeps. It is line-level: it removes lines without
    terminal punctuation, lines with fewer than ``min_words_per_line`` words, lines with a word longer than
    ``max_word_length``, lines mentioning javascript or a cookie/terms-of-use policy, strips Wikipedia-style
    citations ("[1]", "[edit]"), strips each kept line and joins them with "\\n" (so blank lines disappear). Only
    then does it drop whole documents. Put it after filters that should see the original text (language ID). With
    the line rules set to false/null it removes no line, but still strips each line and drops blank lines.
    Drop reasons: lorem_ipsum, curly_bracket, too_few_sentences. Line removals are counted as line-filter-<rule>.
    """

    kind: Literal["c4"] = "c4"
    # "kiln": our class (same decisions, one word split per document); "datatrove": the stock one
    implementation: Implementation = "kiln"
    split_paragraph: bool = True  # True (C4): rules apply per line; False: per sentence (spaCy sentencizer)
    remove_citations: bool = True  # strip Wikipedia-style citations ("[1]", "[edit]")
    filter_no_terminal_punct: bool = True  # remove lines that do not end in terminal punctuation
    min_num_sentences: int | None = 5  # drop documents with fewer sentences left (null: no minimum)
    min_words_per_line: int | None = 3  # remove lines with fewer words (null: keep them)
    max_word_length: int | None = 1000  # remove lines holding a longer word, in characters (null: keep them)
    filter_lorem_ipsum: bool = True  # drop documents containing "lorem ipsum"
    filter_javascript: bool = True  # remove lines mentioning "javascript"
    filter_curly_bracket: bool = True  # drop documents containing "{" (code)
    filter_policy: bool = True  # remove lines about cookies, terms of use and privacy policies
    language: str = "en"  # language of datatrove's word tokenizer and sentence splitter (ISO 639-1/3 code)

    def validate(self) -> None:
        _check_min("min_num_sentences", self.min_num_sentences, 0)
        _check_min("min_words_per_line", self.min_words_per_line, 0)
        _check_min("max_word_length", self.max_word_length, 1)
        _check_tokenizer_language(self.language)


@dataclass
class FineWebQualityConfig:
    """FineWeb's own quality rules via datatrove's ``FineWebQualityFilter``.

    Drop reasons: empty, line_punct_ratio, short_line_ratio, char_dup_ratio, list_ratio.
    """

    kind: Literal["fineweb"] = "fineweb"
    # "kiln": our class (same decisions, one word split per document); "datatrove": the stock one
    implementation: Implementation = "kiln"
    line_punct_thr: float = 0.12  # min fraction of lines ending in terminal punctuation
    line_punct_exclude_zero: bool = False  # True: keep documents where NO line ends in punctuation
    stop_chars: list[str] | None = None  # None: datatrove's TERMINAL_PUNCTUATION
    short_line_thr: float = 0.67  # max fraction of lines of <= short_line_length characters
    short_line_length: int = 30  # a line of at most this many characters is short (see short_line_thr)
    char_duplicates_ratio: float = 0.01  # max fraction of characters in duplicated lines
    new_line_ratio: float = 0.3  # max newlines per word
    language: str = "en"  # language of datatrove's word tokenizer (ISO 639-1/3 code)

    def validate(self) -> None:
        for name in ("line_punct_thr", "short_line_thr", "char_duplicates_ratio"):
            _check_fraction(name, getattr(self, name), allow_none=False)
        if self.new_line_ratio < 0:
            raise ValueError(f"new_line_ratio must be >= 0, got {self.new_line_ratio}")
        if self.short_line_length < 0:
            raise ValueError(f"short_line_length must be >= 0, got {self.short_line_length}")
        if self.stop_chars is not None and not self.stop_chars:
            raise ValueError("stop_chars must not be empty (use null for datatrove's terminal punctuation)")
        _check_tokenizer_language(self.language)


@dataclass
class LanguageConfig:
    """Offline language identification; records ``language`` and ``language_score`` in ``doc.metadata``.

    Backend: py3langid (its model ships inside the package), or a fastText LID model given by path
    (``fasttext_model``, e.g. a local copy of lid.176.bin). Nothing is downloaded.
    A document is kept when one of ``languages`` scores above ``threshold`` (empty list: any language).
    Drop reasons: wrong_language (the best language is not wanted), low_language_score (wanted, not confident).
    """

    kind: Literal["language"] = "language"
    languages: list[str] = field(default_factory=lambda: ["en"])  # language codes to keep (empty list: any language)
    threshold: float = 0.65  # minimum score of a wanted language
    fasttext_model: str | None = None  # path of a fastText LID model (e.g. lid.176.bin); null: py3langid
    label_only: bool = False  # True: annotate metadata, drop nothing

    def validate(self) -> None:
        _check_fraction("threshold", self.threshold, allow_none=False)
        for code in self.languages:
            if not _LANG_CODE.match(code):
                raise ValueError(f"languages: {code!r} is not a language code (expected e.g. 'en', 'fr', 'de')")
        if self.fasttext_model is not None and not self.fasttext_model:
            raise ValueError("fasttext_model must be a path (or null for py3langid)")


@dataclass
class QualityClassifierConfig:
    """DCLM-style model-based quality filter: a fastText classifier trained by ``kiln data train-quality``.

    The probability of ``positive_label`` is written to ``doc.metadata[metadata_key]``; documents scoring below
    ``threshold`` are dropped with reason ``low_quality_score``.
    """

    kind: Literal["quality_classifier"] = "quality_classifier"
    model: str = field(kw_only=True)  # path of the .bin written by `kiln data train-quality`
    threshold: float = 0.5  # drop documents whose positive_label probability is below it
    positive_label: str = "hq"  # the classifier's label for good documents, without __label__
    metadata_key: str = "quality_score"  # doc.metadata key that receives the score

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model must be the path of a fastText model (kiln data train-quality --output)")
        _check_fraction("threshold", self.threshold, allow_none=False)
        if not self.positive_label or self.positive_label.startswith("__label__"):
            raise ValueError(f"positive_label must be the bare label (e.g. 'hq'), got {self.positive_label!r}")
        if not self.metadata_key:
            raise ValueError("metadata_key must not be empty")


# The tagged union a recipe's `filters:` list holds; kiln.config picks the member by its `kind`.
FilterConfig = (
    GopherQualityConfig
    | GopherRepetitionConfig
    | C4QualityConfig
    | FineWebQualityConfig
    | LanguageConfig
    | QualityClassifierConfig
    | DecontaminateConfig
)

FILTER_CONFIGS: dict[str, type] = {
    c.kind: c
    for c in (
        GopherQualityConfig,
        GopherRepetitionConfig,
        C4QualityConfig,
        FineWebQualityConfig,
        LanguageConfig,
        QualityClassifierConfig,
        DecontaminateConfig,
    )
}
