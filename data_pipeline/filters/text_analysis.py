"""One word split per document, shared by our heuristic filters, equal to datatrove's ``split_into_words``.

datatrove's Gopher, C4 and FineWeb filters each call ``split_into_words`` / ``split_into_sentences`` (spaCy) on their
own, and that is almost all of their time (datatrove's 5-text ``lru_cache`` lets Gopher quality reuse Gopher
repetition's split, but C4 splits every kept line again and FineWeb splits C4's edited text). This module computes the
split once per text and keeps the last few in a small cache keyed by the text itself (so a document edited by a step,
or another document, can never be served a stale split), and it calls the very same spaCy tokenizer more cheaply:

- datatrove runs the whole ``spacy.blank(lang)`` pipeline (tokenizer + sentencizer) inside a spaCy *memory zone* per
  call. Inside a zone spaCy neither caches tokenized chunks nor keeps lexemes, so every call re-runs the affix
  regexes and rebuilds every lexeme (Python attribute getters per new word), and it materialises a ``Token`` object
  per token. We call the ``Tokenizer`` alone, outside memory zones, and read the tokens' offsets, lengths and
  ``is_punct`` flags in one ``Doc.to_array`` call. The tokenizer's chunk cache is a pure memo (spaCy already refuses
  to cache chunks touched by special cases, #1250), and a lexeme's flags are a function of its string, so the tokens
  are the same; memory stays bounded because we start a fresh ``spacy.blank`` (built by datatrove's own
  ``SpaCyTokenizer``, so the same configuration) when its vocabulary passes ``VOCAB_LIMIT``. Our tokenizer's new
  lexemes compute only ``is_punct``, the one lexeme attribute read here (tokenization reads none).
- A token's text is ``text[idx:idx + length]`` (spaCy tokenization is non-destructive), and ``words`` applies
  datatrove's ``strip_strings`` to those texts.
- Sentence counts of C4 lines replicate spaCy's ``Sentencizer.predict`` on the line's tokens (see
  ``count_sentences``) instead of running a pipeline per line.
- The tokens of a line of a document are the document's tokens inside that line: spaCy's tokenizer splits at every
  whitespace run first and tokenizes each non-whitespace chunk on its own; a line break is never a single ``" "``,
  so there is always a whitespace token between two lines, and the only special cases that contain whitespace are
  single whitespace tokens (checked when the tokenizer is loaded; otherwise this shortcut is off). So C4 reads its
  lines' tokens from the document's split, and the words of the text it keeps are the concatenated words of the
  kept lines, which FineWeb (next in the recipe) then reads from the cache.

Texts containing the literal "IS_ALPHA" go through datatrove's own functions (see ``Splitter.tokens``).

Languages whose datatrove tokenizer is not a plain rule-based spaCy tokenizer (Japanese chunking, Chinese/Vietnamese
segmenters, NLTK, Stanza, ...) use datatrove's ``split_into_words`` / ``split_into_sentences`` themselves, still once
per document.

Identity with datatrove is tested document by document (tests/test_filters_fast.py) and benchmarked
(benchmarks/filters.py).
"""

from __future__ import annotations

import bisect
import operator
import os
import sys
from collections import OrderedDict
from functools import cache

# A fresh tokenizer is started when its vocabulary holds more lexemes than this: ~60 MB of spaCy memory (1,300 web
# pages make ~80k lexemes, ~45 MB). Starting one costs ~0.1 s, and the next few hundred documents are slower.
VOCAB_LIMIT = 100_000
CACHE_SIZE = 8


def import_spacy_without_torch():
    """Import spaCy without letting thinc import torch (~1.2 s of CPU in every worker process that loads a word
    tokenizer; the rule-based tokenizers never use it). Only when neither torch nor thinc is imported yet: a process
    that has torch keeps it. ``import torch`` works normally afterwards; only thinc's own torch support stays off in
    this process. Set ``KILN_SPACY_TORCH=1`` to import spaCy as is."""
    if "thinc" in sys.modules or "torch" in sys.modules or os.environ.get("KILN_SPACY_TORCH") == "1":
        import spacy

        return spacy
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError while this is set
    try:
        import spacy
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return spacy


class TextAnalysis:
    """The tokens of one text. ``words`` is exactly ``datatrove.utils.text.split_into_words(text, language)``;
    ``tokens`` (fast spaCy path only) are all spaCy tokens, whitespace tokens included, as parallel lists of start
    and end offsets and ``is_punct`` flags, or None when this text was seeded with its words only."""

    __slots__ = ("_words", "ends", "flags", "starts", "text")

    def __init__(self, text: str, words: list[str] | None = None, tokens=None):
        self.text = text
        self._words = words
        self.starts, self.ends, self.flags = tokens if tokens is not None else (None, None, None)

    @property
    def has_tokens(self) -> bool:
        return self.starts is not None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = words_of(self.text, self.starts, self.ends)
        return self._words

    def token_range(self, start: int, end: int) -> tuple[int, int]:
        """Indices [i, j) of the tokens inside the character range [start, end) of a line (see module doc)."""
        i = bisect.bisect_left(self.starts, start)
        j = bisect.bisect_left(self.starts, end, lo=i)
        return i, j


def words_of(text: str, starts: list[int], ends: list[int]) -> list[str]:
    """datatrove's ``strip_strings`` of the token texts ``text[start:end]``: stripped, empty ones dropped."""
    return list(filter(None, map(str.strip, map(text.__getitem__, map(slice, starts, ends)))))


class Splitter:
    """Word and sentence splitting for one datatrove language key, identical to datatrove's functions."""

    def __init__(self, language: str):
        from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

        self.language = language
        stock = load_word_tokenizer(language)
        # plain rule-based spaCy tokenizers only: datatrove chunks Japanese, and zh/vi use other segmenters
        self._spacy_lang = stock.language if type(stock) is SpaCyTokenizer and stock.config is None else None
        if self._spacy_lang == "ja":
            self._spacy_lang = None
        self._tokenizer = None
        self.punct_chars: frozenset[str] = frozenset()
        self.fast = self._spacy_lang is not None and self._load() is not None
        self._cache: OrderedDict[str, TextAnalysis] = OrderedDict()

    # ------------------------------------------------------------------ spaCy
    def _load(self):
        """A fresh ``spacy.blank`` tokenizer, built by datatrove's SpaCyTokenizer (same config); None if it is not
        the rule-based Tokenizer this module reasons about."""
        import_spacy_without_torch()
        from datatrove.utils.word_tokenizers import SpaCyTokenizer
        from spacy.attrs import IS_PUNCT
        from spacy.tokenizer import Tokenizer

        nlp = SpaCyTokenizer(self._spacy_lang).tokenizer
        tokenizer = nlp.tokenizer
        if type(tokenizer) is not Tokenizer or "sentencizer" not in nlp.pipe_names:
            return None
        # special cases spanning whitespace would tie a line's tokens to its neighbours (module doc)
        if any(any(c.isspace() for c in k) and not k.isspace() for k in tokenizer.rules or {}):
            return None
        self.punct_chars = frozenset(nlp.get_pipe("sentencizer").punct_chars)
        # A new word's lexeme runs every attribute getter (lower, norm, shape, like_num, ...; Python functions, most
        # of the cost of a new word). Tokenization reads none of them, and we read only is_punct, so the others
        # are not computed for words this tokenizer has not seen yet (its own vocabulary, not datatrove's).
        getters = nlp.vocab.lex_attr_getters
        nlp.vocab.lex_attr_getters = {IS_PUNCT: getters[IS_PUNCT]} if IS_PUNCT in getters else {}
        self._tokenizer = tokenizer
        return tokenizer

    def tokens(self, text: str):
        """(starts, ends, is_punct flags) of every spaCy token of ``text``; None where datatrove's own function
        must be used: fast path off, spaCy raised, or the text contains "IS_ALPHA". That string is spaCy's symbol 1,
        and looking it up as a word fails or not depending on what the vocabulary saw before; datatrove then
        retries without it (word_tokenizers.py), so its split of such a text depends on its own history and only
        its own tokenizer can reproduce it."""
        if not self.fast or "IS_ALPHA" in text:
            return None
        from spacy.attrs import IDX, IS_PUNCT, LENGTH

        tokenizer = self._tokenizer
        if len(tokenizer.vocab) > VOCAB_LIMIT:
            tokenizer = self._load() or tokenizer
        try:
            doc = tokenizer(text)
            if not len(doc):
                return [], [], []
            rows = doc.to_array([IDX, LENGTH, IS_PUNCT]).T.tolist()
        except Exception:  # noqa: BLE001 - fall back to datatrove's path, which handles (or raises) the same way
            return None
        return rows[0], list(map(operator.add, rows[0], rows[1])), rows[2]

    # ------------------------------------------------------------------ per text
    def analyse(self, text: str, *, need_tokens: bool = False) -> TextAnalysis:
        """The (cached) analysis of ``text``; ``need_tokens``: re-split a text cached with its words only."""
        cached = self._cache.get(text)
        if cached is not None and (cached.has_tokens or not need_tokens or not self.fast):
            self._cache.move_to_end(text)
            return cached
        toks = self.tokens(text)
        if toks is None:
            from datatrove.utils.text import split_into_words

            result = TextAnalysis(text, words=split_into_words(text, self.language))
        else:
            result = TextAnalysis(text, tokens=toks)
        self._remember(result)
        return result

    def peek(self, text: str) -> TextAnalysis | None:
        return self._cache.get(text)

    def seed(self, text: str, words: list[str]) -> None:
        """Record the words of a text computed elsewhere (C4's output from its kept lines)."""
        if text not in self._cache:
            self._remember(TextAnalysis(text, words=words))

    def _remember(self, result: TextAnalysis) -> None:
        self._cache[result.text] = result
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def words(self, text: str) -> list[str]:
        return self.analyse(text).words

    def count_sentences_of(self, text: str) -> int:
        """``len(split_into_sentences(text, language))``."""
        toks = self.tokens(text)
        if toks is None:
            from datatrove.utils.text import split_into_sentences

            return len(split_into_sentences(text, self.language))
        return self.count_sentences(text, toks[0], toks[1], toks[2], 0, len(toks[0]))

    def count_sentences(self, text: str, starts, ends, flags, i: int, j: int) -> int:
        """``len(split_into_sentences(line))`` for the line made of tokens [i, j) of ``text``: spaCy's Sentencizer
        marks token 0 and every non-punctuation token that follows a sentence-final character (``punct_chars``)
        as a sentence start; datatrove's split yields one part per sentence, and one part for an empty line."""
        punct_chars = self.punct_chars
        hits = 0
        seen_period = False
        for k in range(i, j):
            in_punct_chars = text[starts[k] : ends[k]] in punct_chars
            if seen_period and not flags[k] and not in_punct_chars:
                hits += 1
                seen_period = False
            elif in_punct_chars:
                seen_period = True
        return 1 + hits


@cache
def splitter(language: str) -> Splitter:
    """The process-wide splitter of a language (built in the worker, on first use)."""
    return Splitter(language)
