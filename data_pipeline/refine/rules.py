"""Rule-based parts of TinyHelen refinement: cleaning, sentence chunking, hash dedup. Pure functions.

Cleaning order (`clean_text`): boilerplate lines are removed first (their markers, e.g. "»" in a nav crumb,
are non-ASCII), then URLs and e-mail addresses, then non-ASCII noise and control characters, then runs of
spaces; empty lines go.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable

# --- non-ASCII noise ---------------------------------------------------------------------------------------

# Typographic characters with a plain ASCII meaning; everything else non-ASCII is decomposed (NFKD: "é" -> "e"
# plus a combining accent, "ﬁ" -> "fi") and what is still non-ASCII is dropped.
_ASCII_EQUIVALENTS = {
    "\u2018": "'",
    "\u2019": "'",
    "\u201a": "'",
    "\u201b": "'",
    "\u2032": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u201e": '"',
    "\u2033": '"',
    "\u00ab": '"',
    "\u00bb": '"',
    "\u2010": "-",
    "\u2011": "-",
    "\u2012": "-",
    "\u2013": "-",
    "\u2014": "-",
    "\u2015": "-",
    "\u2212": "-",
    "\u2022": "-",
    "\u2026": "...",
    "\u00a0": " ",
    "\u2009": " ",
    "\u202f": " ",
    "\u3000": " ",
    "\u200b": "",
    "\u200c": "",
    "\u200d": "",
    "\u2060": "",
    "\ufeff": "",
    "\u00ad": "",
}
_ASCII_TABLE = str.maketrans(_ASCII_EQUIVALENTS)


def strip_non_ascii(text: str) -> str:
    """Map typographic characters to ASCII, drop accents, drop other non-ASCII and control characters.

    Newlines are kept (``\\r\\n`` and ``\\r`` become ``\\n``); tabs become spaces.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_ASCII_TABLE)
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch if ch == "\n" else " " if ch == "\t" else ch for ch in text if ch in "\n\t" or " " <= ch <= "~")


# --- URLs and e-mail addresses -----------------------------------------------------------------------------

EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
# A URL ends before whitespace, quotes and angle brackets, and does not swallow trailing punctuation.
URL_RE = re.compile(r"\b(?:(?:https?|ftp)://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]}]", re.IGNORECASE)
_EMPTY_BRACKETS_RE = re.compile(r"\(\s*\)|\[\s*\]|<\s*>")


def strip_urls_emails(text: str) -> str:
    """Remove URLs (http, https, ftp, www.) and e-mail addresses, and the empty brackets they leave."""
    text = EMAIL_RE.sub("", text)
    text = URL_RE.sub("", text)
    return _EMPTY_BRACKETS_RE.sub("", text)


# --- boilerplate lines -------------------------------------------------------------------------------------

# A line is boilerplate when it is at most BOILERPLATE_MAX_CHARS long and matches one of these (case-insensitive,
# searched anywhere in the stripped line). Long lines are never dropped: a paragraph that mentions cookies stays.
BOILERPLATE_MAX_CHARS = 300
BOILERPLATE_PATTERNS: tuple[str, ...] = (
    # cookie / consent notices
    r"\b(we|this (web)?site|our (web)?site) uses? cookies\b",
    r"\bcookies?\b.*\b(accept|consent|policy|settings|preferences|browsing experience)\b",
    r"\b(accept|allow|reject|decline|manage) (all )?cookies\b",
    # share / follow / subscribe widgets
    r"^(share|tweet|pin it|email|print|facebook|twitter|linkedin|reddit|whatsapp|pinterest)"
    r"(\s*[|/,:-]?\s*(share|tweet|pin it|email|print|facebook|twitter|linkedin|reddit|whatsapp|pinterest))*\s*[:!]?$",
    r"^share (this|on|via|with)\b",
    r"\bfollow us (on|at)\b",
    r"\b(subscribe|sign up)\b.*\bnewsletter\b",
    r"^click here\b",
    # navigation crumbs and page chrome
    r"^(home|start|main page)\s*(>|\u00bb|\u203a|/|\||::|\u2192|-{1,2}>)",
    r"^[^>\u00bb\u203a|]{1,40}(\s*(>|\u00bb|\u203a|\|)\s*[^>\u00bb\u203a|]{1,40}){2,}$",
    r"\bskip to (main )?(content|navigation)\b",
    r"^(back to top|scroll to top)\b",
    r"^(read more|continue reading|load more|show more|see more)\b",
    r"^(log ?in|sign ?in|sign ?up|register|log ?out)\s*(\||/|or|$)",
    r"^advertisements?$",
    r"^(related (posts|articles|stories)|you may also like|recommended for you)\b",
    r"^(previous|next) (post|article|page|story)\b",
    r"^(leave a (comment|reply)|\d+ comments?|no comments( yet)?)\b",
    r"\ball rights reserved\b",
    r"^(\u00a9|\(c\)|copyright)\s",
    r"\b(privacy policy|terms (of|and) (use|service|conditions))\b",
    r"\b(enable|requires?) javascript\b|\bjavascript (is )?(disabled|required)\b",
)
_BOILERPLATE_RE = re.compile("|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS), re.IGNORECASE)


def is_boilerplate_line(line: str) -> bool:
    line = line.strip()
    return bool(line) and len(line) <= BOILERPLATE_MAX_CHARS and _BOILERPLATE_RE.search(line) is not None


def strip_boilerplate(text: str) -> str:
    """Drop boilerplate lines (see BOILERPLATE_PATTERNS); other lines are kept as they are."""
    return "\n".join(line for line in text.split("\n") if not is_boilerplate_line(line))


# --- whole cleaning ----------------------------------------------------------------------------------------

_SPACES_RE = re.compile(r"[ ]{2,}")
_SPACE_BEFORE_PUNCT_RE = re.compile(r" +([.,;:!?])")


def clean_text(text: str, code: bool = False) -> str:
    """Boilerplate lines, URLs/e-mails, non-ASCII noise, extra spaces and empty lines out.

    ``code=True`` only strips non-ASCII/control characters and trailing spaces and keeps indentation, URLs and
    blank-line layout out of the way of the program text.
    """
    if code:
        lines = [line.rstrip() for line in strip_non_ascii(text).split("\n")]
        return "\n".join(line for line in lines if line.strip())
    text = strip_boilerplate(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = strip_non_ascii(strip_urls_emails(text))
    lines = (_SPACE_BEFORE_PUNCT_RE.sub(r"\1", _SPACES_RE.sub(" ", line)).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


# --- sentences, tokens, chunks -----------------------------------------------------------------------------

# Sentence end: ., ! or ? (repeats allowed), optional closing quotes/brackets, then whitespace and a sentence
# start (capital letter, digit, or an opening quote/bracket).
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e no fig inc ltd co gen col lt sgt rev hon approx dept est vol".split()
)
_LAST_WORD_RE = re.compile(r"([A-Za-z.]+)$")


def split_sentences(text: str) -> list[str]:
    """A simple regex sentence splitter; abbreviations ("Dr.", "e.g.") and initials ("J. Smith") do not end a
    sentence. Newlines are treated as spaces (paragraphs are split by `chunk_sentences`)."""
    sentences, start = [], 0
    for m in _SENTENCE_END_RE.finditer(text):
        if text[m.start()] == ".":
            word = _LAST_WORD_RE.search(text[start : m.start()])
            last = word.group(1).lower().strip(".") if word else ""
            if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                continue
        piece = " ".join(text[start : m.end()].split())
        if piece:
            sentences.append(piece)
        start = m.end()
    tail = " ".join(text[start:].split())
    if tail:
        sentences.append(tail)
    return sentences


_APPROX_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def approx_token_count(text: str) -> int:
    """Words plus punctuation marks: a tokenizer-free stand-in for subword token counts."""
    return len(_APPROX_TOKEN_RE.findall(text))


def _split_long(unit: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Cut a unit longer than max_tokens at word boundaries (a word longer than the limit stays whole)."""
    pieces, words, used = [], [], 0
    for word in unit.split(" "):
        n = count_tokens(word)
        if words and used + n > max_tokens:
            pieces.append(" ".join(words))
            words, used = [], 0
        words.append(word)
        used += n
    if words:
        pieces.append(" ".join(words))
    return pieces


def chunk_sentences(
    text: str,
    max_tokens: int,
    count_tokens: Callable[[str], int] = approx_token_count,
    line_units: bool = False,
) -> list[str]:
    """Pack whole sentences into chunks of at most ``max_tokens`` (counted per sentence and summed).

    Units are sentences of each line (``line_units=True``: whole lines, for code and conversations). Units in
    the same line are joined with a space, units of different lines with a newline. A unit longer than the
    limit is cut at word boundaries.
    """
    units: list[tuple[int, str, int]] = []  # (line index, text, tokens)
    for li, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        for sentence in [line] if line_units else split_sentences(line):
            n = count_tokens(sentence)
            pieces = [sentence] if n <= max_tokens else _split_long(sentence, max_tokens, count_tokens)
            units += [(li, p, n if len(pieces) == 1 else count_tokens(p)) for p in pieces]
    chunks: list[str] = []
    current, used, last_line = "", 0, -1
    for li, unit, n in units:
        if current and used + n > max_tokens:
            chunks.append(current)
            current, used = "", 0
        if current:
            current += (" " if li == last_line else "\n") + unit
        else:
            current = unit
        used += n
        last_line = li
    if current:
        chunks.append(current)
    return chunks


# --- hash dedup --------------------------------------------------------------------------------------------


def chunk_hash(text: str) -> bytes:
    """16-byte hash of a chunk, insensitive to case and whitespace."""
    normalized = " ".join(text.lower().split())
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


class ChunkDeduper:
    """Exact dedup by `chunk_hash`, first occurrence wins (rank-local; cross-rank dedup is the dedup stage's)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        h = chunk_hash(text)
        if h in self._seen:
            return True
        self._seen.add(h)
        return False


# --- LLM output post-processing ----------------------------------------------------------------------------

_PREAMBLE_RE = re.compile(
    r"^(sure|certainly|okay|ok|of course|here('s| is| are)|below is|rewritten|simplified|simple version)\b.*:$",
    re.IGNORECASE,
)
_LAST_SENTENCE_END_RE = re.compile(r"[.!?][\"')\]]*(?=[^.!?]*$)")


def strip_preamble(text: str) -> str:
    """Drop a leading "Here is the rewritten text:" style line and quotes wrapping the whole answer."""
    text = text.strip()
    first, _, rest = text.partition("\n")
    if _PREAMBLE_RE.match(first.strip()):
        text = rest.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def trim_to_last_sentence(text: str) -> str:
    """Cut a truncated generation after its last complete sentence ("" when there is none)."""
    m = _LAST_SENTENCE_END_RE.search(text)
    return text[: m.end()].rstrip() if m else ""
