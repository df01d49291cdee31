"""Normalisation and hashing: content hash, URL hash, and vectorised MinHash signatures with LSH band hashes.

Everything here is a pure function of the text and the config (no per-process randomness), so every rank and
every executor produces the same hashes. Hash value 0 is reserved for "no key" (no URL, too few words for a
shingle): real hashes that come out as 0 are mapped to 1.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

import numpy as np
import regex
import xxhash
from datatrove.utils.text import PUNCTUATION

from .config import DedupConfig, MinhashConfig

MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_U64 = np.uint64
# Python's re: \d matches any Unicode decimal digit (category Nd), like datatrove's \p{Nd} pattern
_NUMBERS = re.compile(r"\d+(?:[.,،٫⎖⎗⎘]\d+)?")
_COMBINING_MARKS = regex.compile(r"\p{Mn}+")
_WHITESPACE = re.compile(r"\s+")
# datatrove's punctuation set (its PUNCTUATION_TRANS); a regex class is ~4x faster than str.translate here
_PUNCTUATION = re.compile("[" + "".join(re.escape(c) for c in sorted(set(PUNCTUATION))) + "]+")


def _nonzero(h: int) -> int:
    return h or 1


def content_hash(text: str, cfg: DedupConfig) -> int:
    """64-bit hash of the document text after the exact-dedup normalisation (never 0)."""
    if cfg.exact_collapse_whitespace:
        text = _WHITESPACE.sub(" ", text).strip()
    if cfg.exact_lowercase:
        text = text.lower()
    return _nonzero(xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")))


def normalize_url(url: str, drop_query: bool = False) -> str:
    """``https://www.Example.com:443/a/b/?q=1#frag`` -> ``example.com/a/b?q=1``."""
    raw = url.strip()
    try:
        parts = urlsplit(raw if "://" in raw or raw.startswith("//") else "//" + raw)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port
    except ValueError:  # malformed netloc or port: fall back to the raw string, still comparable
        return raw.lower().split("#", 1)[0].rstrip("/")
    if host.startswith("www."):
        host = host[4:]
    netloc = host if port in (None, 80, 443) else f"{host}:{port}"
    path = parts.path.rstrip("/")
    query = "" if drop_query or not parts.query else "?" + parts.query
    return netloc + path + query


def url_hash(url: str | None, cfg: DedupConfig) -> int:
    """64-bit hash of the normalised URL; 0 when there is no URL."""
    if not url or not isinstance(url, str):
        return 0
    return _nonzero(xxhash.xxh3_64_intdigest(normalize_url(url, cfg.url_drop_query).encode("utf-8", "surrogatepass")))


def minhash_words(text: str, cfg: MinhashConfig) -> list[str]:
    """Normalised words (datatrove's ``simplify_text`` semantics; words are split on whitespace)."""
    if cfg.lowercase:
        text = text.lower()
    if cfg.norm_numbers:
        text = _NUMBERS.sub("0", text)
    if cfg.remove_punctuation:
        text = _PUNCTUATION.sub(" ", text)
    if cfg.norm_diacritics and not text.isascii():
        text = _COMBINING_MARKS.sub("", unicodedata.normalize("NFD", text))
    return text.split()


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (wrapping arithmetic)."""
    h ^= h >> _U64(30)
    h *= _U64(0xBF58476D1CE4E5B9)
    h ^= h >> _U64(27)
    h *= _U64(0x94D049BB133111EB)
    h ^= h >> _U64(31)
    return h


class MinHasher:
    """Vectorised MinHash: shingle hashes of many documents go through all permutations as one matrix op.

    Permutation i maps a 64-bit shingle hash x to ``((a_i * x + b_i) mod 2**64) mod (2**61 - 1)``: the same
    family as datatrove (whose ``a * x`` also wraps in uint64), but the Mersenne modulus is computed with two bit
    operations and a wrapping subtraction instead of numpy's 64-bit division, and a batch of documents is done as
    one (shingles x hashes) matrix in cache-sized row chunks, reduced per document with ``minimum.reduceat``.
    The wrap modulo 2**64 matters: it is what scrambles the order of the shingles differently for each ``a_i``.
    """

    def __init__(self, cfg: MinhashConfig, chunk_rows: int = 1024):
        self.cfg = cfg
        self.chunk_rows = chunk_rows
        rng = np.random.default_rng(cfg.seed)
        k = cfg.num_hashes
        self.a = rng.integers(1, MERSENNE_PRIME, size=k, dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE_PRIME, size=k, dtype=np.uint64)
        # odd multipliers that make the n-gram hash order-sensitive
        self.ngram_mult = rng.integers(0, 1 << 63, size=cfg.ngram, dtype=np.uint64) * _U64(2) + _U64(1)

    def shingles(self, text: str) -> np.ndarray:
        """64-bit hashes of the word n-grams of ``text``; empty when it has fewer than ``ngram`` words."""
        words = minhash_words(text, self.cfg)
        n = self.cfg.ngram
        m = len(words) - n + 1
        if m <= 0:
            return np.empty(0, dtype=np.uint64)
        w = np.fromiter(map(xxhash.xxh3_64_intdigest, words), dtype=np.uint64, count=len(words))
        h = w[:m] * self.ngram_mult[0]
        for j in range(1, n):
            h += w[j : j + m] * self.ngram_mult[j]
        return _mix64(h)

    def signatures(self, shingle_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Signatures (docs, num_hashes) uint64 and a mask of docs that have at least one shingle."""
        k = self.cfg.num_hashes
        lengths = np.fromiter((len(s) for s in shingle_lists), dtype=np.int64, count=len(shingle_lists))
        valid = lengths > 0
        sigs = np.full((len(shingle_lists), k), np.iinfo(np.uint64).max, dtype=np.uint64)
        if not valid.any():
            return sigs, valid
        flat = np.concatenate([s for s in shingle_lists if len(s)])
        starts = np.zeros(len(shingle_lists), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        doc_ids = np.flatnonzero(valid)
        doc_starts = starts[doc_ids]
        a, b = self.a[None, :], self.b[None, :]
        for c0 in range(0, len(flat), self.chunk_rows):
            c1 = min(c0 + self.chunk_rows, len(flat))
            # segments: each document (part) that overlaps [c0, c1)
            first = np.searchsorted(doc_starts, c0, side="right") - 1
            last = np.searchsorted(doc_starts, c1, side="left")
            seg_docs = doc_ids[first:last]
            seg_starts = np.maximum(doc_starts[first:last], c0) - c0
            y = flat[c0:c1, None] * a
            y += b
            r = y >> _U64(61)
            y &= MERSENNE_PRIME
            y += r
            np.minimum(y, y - MERSENNE_PRIME, out=y)  # y - P wraps around when y < P
            seg_min = np.minimum.reduceat(y, seg_starts, axis=0)
            np.minimum(sigs[seg_docs], seg_min, out=seg_min)
            sigs[seg_docs] = seg_min
        return sigs, valid

    def band_hashes(self, sigs: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """LSH band hashes (docs, buckets) uint64: one 64-bit hash of each band's ``hashes_per_bucket`` rows."""
        cfg = self.cfg
        bands = sigs.reshape(len(sigs), cfg.buckets, cfg.hashes_per_bucket)
        h = np.full((len(sigs), cfg.buckets), 0x9E3779B97F4A7C15, dtype=np.uint64)
        for r in range(cfg.hashes_per_bucket):
            h ^= bands[:, :, r]
            _mix64(h)
        h[h == 0] = 1
        h[~valid] = 0
        return h
