"""Lexical simplicity: the share of a text's words that are among the K most common English words.

Words are lowercase runs of ASCII letters with inner apostrophes ("don't", "it's"); numbers and punctuation
are not words. The word list is `wordfreq.top_n_list("en", K)` (shipped with wordfreq, no network). A text
without words scores 0.0.
"""

from __future__ import annotations

import re
from functools import lru_cache

import wordfreq

WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")


@lru_cache(maxsize=8)
def common_words(k: int = 2000) -> frozenset[str]:
    return frozenset(wordfreq.top_n_list("en", k))


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower().replace("\u2019", "'"))


def lexical_simplicity(text: str, k: int = 2000) -> float:
    ws = words(text)
    if not ws:
        return 0.0
    common = common_words(k)
    return sum(w in common for w in ws) / len(ws)
