"""Our Gopher quality, Gopher repetition, C4 and FineWeb filters: datatrove's rules, decisions and reasons, faster.

Why not datatrove's filters as they are: each of them splits the document into words with spaCy again
(``split_into_words``; C4 even runs spaCy's pipeline once per line to count sentences), through a call path that
rebuilds spaCy's lexemes and ``Token`` objects for every call. Profiling shows that is almost all of their time: the
four together filter 12-22 web pages/s on one core (benchmarks/results/filters.md). These classes subclass datatrove's (same constructor, attributes, step names, stats and exclusion writer)
and override only ``filter``: the rules are the same code in the same order, but the words come from
``text_analysis`` (one split per document shared by all four, identical to ``split_into_words``; see its docstring
for why), and the per-word and n-gram arithmetic is done on distinct words and string slices with exactly the same
results. ``implementation: datatrove`` in a filter's config selects datatrove's class instead; tests and
``benchmarks/filters.py`` check that both decide the same for every document.
"""

from __future__ import annotations

from collections import Counter
from itertools import accumulate
from operator import add

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.c4_filters import (
    CITATION_REGEX,
    ELLIPSIS,
    END_PUNCTUATION,
    POLICY_SUBSTRINGS,
)
from datatrove.pipeline.filters.gopher_repetition_filter import (
    find_all_duplicate,
    find_duplicates,
    find_top_duplicate,
    get_n_grams,
)
from datatrove.utils.text import PUNCTUATION_SET, split_into_sentences

from kiln.data_pipeline.filters.text_analysis import splitter, words_of

_is_all_punctuation = PUNCTUATION_SET.issuperset  # == not any(ch not in PUNCTUATION_SET for ch in w)


def _has_alpha(word: str) -> bool:
    """``any(c.isalpha() for c in word)``; an ASCII character is alphabetic exactly when it has case."""
    if word.isascii():
        return word.upper() != word.lower()
    return any(c.isalpha() for c in word)


class KilnGopherQualityFilter(GopherQualityFilter):
    """datatrove's ``GopherQualityFilter`` rules on a shared word split, per distinct word."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        words = splitter(self.language).words(text)
        n_words = len(words)
        counts = Counter(words)
        n_non_symbol_words = 0
        non_symbol_chars = 0
        for w, c in counts.items():
            if not _is_all_punctuation(w):
                n_non_symbol_words += c
                non_symbol_chars += len(w) * c

        if self.min_doc_words and n_non_symbol_words < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol_words > self.max_doc_words:
            return False, "gopher_long_doc"

        # numpy's mean of these integers is their exact sum over their count, correctly rounded: the same float
        avg_n_words = non_symbol_chars / n_non_symbol_words if n_non_symbol_words else float("nan")
        if self.min_avg_word_length and avg_n_words < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg_n_words > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"

        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"

        lines = text.splitlines()
        if (
            self.max_bullet_lines_ratio
            and sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > self.max_bullet_lines_ratio
        ):
            return False, "gopher_too_many_bullets"
        if (
            self.max_ellipsis_lines_ratio
            and sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > self.max_ellipsis_lines_ratio
        ):
            return False, "gopher_too_many_end_ellipsis"

        if self.max_non_alpha_words_ratio:
            n_alpha = sum(c for w, c in counts.items() if _has_alpha(w))
            if n_alpha / n_words < self.max_non_alpha_words_ratio:
                return False, "gopher_below_alpha_threshold"

        if self.min_stop_words and len(self.stop_words.intersection(counts)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"

        return True


def _top_ngram_chars(spaced: str, starts: list[int], after: list[int], n_words: int, n: int) -> int:
    """``find_top_duplicate(get_n_grams(words, n))``: the same n-gram strings in the same order (so the same first
    most common one), as slices of the space-joined words (word k is ``spaced[starts[k]:after[k]]``)."""
    stop = n_words - n + 1
    grams = map(spaced.__getitem__, map(slice, starts[:stop], after[n - 1 : n - 1 + stop]))
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def _duplicate_ngram_chars(concat: str, bounds: list[int], n_words: int, n: int) -> int:
    """``find_all_duplicate(words, n)``: the same n-gram strings, as slices of the concatenated words (word k is
    ``concat[bounds[k]:bounds[k + 1]]``). datatrove walks every position, adding unseen n-grams to a set and
    jumping n positions past a seen one. An n-gram that occurs once in the document is never seen again, so only
    the positions of n-grams that occur more than once are walked; the jumps are the same."""
    stop = n_words - n + 1
    if stop <= 0:
        return 0
    grams = list(map(concat.__getitem__, map(slice, bounds[:stop], bounds[n : n + stop])))
    counts = Counter(grams)
    if len(counts) == stop:
        return 0
    repeated_grams = {g for g, c in counts.items() if c > 1}
    seen: set[str] = set()
    repeated = 0
    skip_until = 0
    for i in [i for i, g in enumerate(grams) if g in repeated_grams]:
        if i < skip_until:
            continue
        gram = grams[i]
        if gram in seen:
            repeated += len(gram)
            skip_until = i + n
        else:
            seen.add(gram)
    return repeated


class KilnGopherRepetitionFilter(GopherRepetitionFilter):
    """datatrove's ``GopherRepetitionFilter`` rules on a shared word split, n-grams as string slices."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        if not text:
            return False, "empty"

        paragraphs = self.paragraph_exp.split(text.strip())
        paragraphs_duplicates, char_duplicates = find_duplicates(paragraphs)
        if self.dup_para_frac and paragraphs_duplicates / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and char_duplicates / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"

        lines = self._line_splitter.split(text)
        line_duplicates, char_duplicates = find_duplicates(lines)
        if self.dup_line_frac and line_duplicates / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and char_duplicates / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"

        words = splitter(self.language).words(text)
        n_words = len(words)
        text_len = len(text)

        bounds = [0, *accumulate(map(len, words))]  # word k is concat[bounds[k]:bounds[k + 1]]
        if self.top_n_grams:
            spaced = " ".join(words)  # word k is spaced[starts[k]:after[k]]
            starts = list(map(add, bounds[:-1], range(n_words)))
            after = list(map(add, bounds[1:], range(n_words)))
        for n, n_frac in self.top_n_grams:
            if n < 1:  # not reachable from our config; keep datatrove's behaviour
                n_grams = get_n_grams(words, n)
                top_char_length = find_top_duplicate(n_grams) if n_grams else None
            else:
                top_char_length = _top_ngram_chars(spaced, starts, after, n_words, n) if n_words >= n else None
            if top_char_length is None:
                continue
            if top_char_length / text_len > n_frac:
                return False, f"top_{n}_gram"

        if self.dup_n_grams:
            concat = "".join(words)
        for n, n_frac in self.dup_n_grams:
            if n < 1:
                n_duplicates_char = find_all_duplicate(words, n)
            else:
                n_duplicates_char = _duplicate_ngram_chars(concat, bounds, n_words, n)
            if n_duplicates_char / text_len > n_frac:
                return False, f"duplicated_{n}_n_grams"

        return True


class KilnC4QualityFilter(C4QualityFilter):
    """datatrove's ``C4QualityFilter``: the same line rules and text edits; a line's sentences are counted on its
    tokens from the document's split, and the words of the kept text are recorded for the filters after it."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not self.split_paragraph:  # per-sentence mode: one sentence split per document, as datatrove does
            return super().filter(doc)
        text = doc.text
        sp = splitter(self.language)
        count_sentences = self.min_num_sentences != -1
        analysis = None
        if sp.fast:
            analysis = sp.analyse(text, need_tokens=True) if count_sentences else sp.peek(text)
            if analysis is not None and not analysis.has_tokens:
                analysis = None
        record_words = analysis is not None  # the words of the kept text, from its lines' tokens
        kept_words: list[str] = []

        num_sentences = 0
        kept_lines = []
        offset = 0
        for raw in text.splitlines(keepends=True):  # the same lines as splitlines(): line ends are whitespace
            line_start = offset
            offset += len(raw)
            line = raw.strip()
            words = line.split()
            self.stat_update("line-total")
            if self.max_word_length != -1 and words and max(map(len, words)) > self.max_word_length:
                self.stat_update("line-filter-too_long_word")
                continue
            edited = False
            if self.remove_citations and "[" in line:  # every citation match starts with "["
                cleaned = CITATION_REGEX.sub("", line)
                edited = cleaned != line
                line = cleaned
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                self.stat_update("line-filter-no_terminal_punc")
                continue
            if len(words) < self.min_words_per_line:
                self.stat_update("line-filter-too_few_words")
                continue
            line_l = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in line_l:
                return False, "lorem_ipsum"
            if self.filter_javascript and "javascript" in line_l:
                self.stat_update("line-filter-javascript")
                continue
            if self.filter_curly_bracket and "{" in line:
                return False, "curly_bracket"
            if self.filter_policy and any(p in line_l for p in POLICY_SUBSTRINGS):
                self.stat_update("line-filter-policy")
                continue
            if count_sentences or record_words:
                if analysis is not None and not edited:  # the line's tokens are the document's tokens inside it
                    src, starts, ends, flags = text, analysis.starts, analysis.ends, analysis.flags
                    first = line_start + len(raw) - len(raw.lstrip())
                    i, j = analysis.token_range(first, first + len(line))
                else:
                    toks = sp.tokens(line)
                    if toks is None:
                        src = None
                    else:
                        src, (starts, ends, flags) = line, toks
                        i, j = 0, len(starts)
                if src is None:  # spaCy refused this line: datatrove's own functions, no recorded words
                    record_words = False
                    if count_sentences:
                        num_sentences += len(split_into_sentences(line, self.language))
                else:
                    if count_sentences:
                        num_sentences += sp.count_sentences(src, starts, ends, flags, i, j)
                    if record_words:
                        kept_words += words_of(src, starts[i:j], ends[i:j])
            kept_lines.append(line)
            self.stat_update("line-kept")
        if num_sentences < self.min_num_sentences:
            return False, "too_few_sentences"

        doc.text = "\n".join(kept_lines).strip()
        if record_words:
            sp.seed(doc.text, kept_words)
        return True


class KilnFineWebQualityFilter(FineWebQualityFilter):
    """datatrove's ``FineWebQualityFilter`` on the shared word split."""

    def filter(self, doc) -> bool | tuple[bool, str]:
        lines = doc.text.split("\n")
        lines = [line for line in lines if line.strip() != ""]
        if len(lines) == 0:
            return False, "empty"
        ratio = sum(1 for line in lines if line.endswith(self.stop_chars)) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return False, "line_punct_ratio"

        ratio = sum(1 for line in lines if len(line) <= self.short_line_length) / len(lines)
        if ratio > self.short_line_threshold:
            return False, "short_line_ratio"

        ratio = find_duplicates(lines)[1] / len(doc.text.replace("\n", ""))
        if ratio > self.char_duplicates_ratio:
            return False, "char_dup_ratio"

        words = splitter(self.language).words(doc.text)
        new_line = doc.text.count("\n")
        if new_line / len(words) > self.new_line_ratio:
            return False, "list_ratio"

        return True
