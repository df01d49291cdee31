"""Normalised word n-grams and the bounded-memory index of the evaluation sets' n-grams.

Normalisation (the same function for eval items and training documents, version ``NORMALISATION_VERSION``):

1. delete every character whose Unicode general category is punctuation (``P*``: ``.,;:!?'"-_()[]{}``, dashes,
   curly quotes, ...; symbols such as ``$ + = ©`` and digits are kept), per Python's ``unicodedata``;
2. lowercase with ``str.lower``;
3. split on whitespace (``str.split``); the words are the non-empty pieces.

So ``"The U.S. (2020) -- don't!"`` gives ``["the", "us", "2020", "dont"]``. ``word_spans`` is the same
normalisation applied token by token to ``\\S+`` matches, which also gives each word's character span in the
original text (the split policy cuts there); the two give the same words (a test checks it on real text).

Hashing: each word is hashed with xxHash (``xxh3_64`` of its UTF-8 bytes); an n-gram's hash is the polynomial
``sum(w[i+j] * P**(n-1-j)) mod 2**64`` of its word hashes, passed through the splitmix64 finaliser, computed for
all n-grams of a text at once with numpy. Two different n-grams collide with probability about 2**-64.

Index: a sorted ``uint64`` array of n-gram hashes and, aligned with it, the ``uint32`` global id of the eval item
each comes from: 12 bytes per distinct (n-gram, eval item) pair, nothing else per n-gram. It is built once (when
the pipeline is built) and cached as ``.npy`` files that every task memory-maps, so tasks share one copy through
the page cache. Lookups are ``np.searchsorted``: O(m log N) for a document of m n-grams.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xxhash

from kiln.data_pipeline.decontaminate.sources import detect_format, iter_items

NORMALISATION_VERSION = 1
BYTES_PER_NGRAM = 12  # uint64 hash + uint32 item id per distinct (n-gram, eval item) pair
_P = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so multiplication mod 2**64 is a bijection
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TOKEN = re.compile(r"\S+")  # re's \s is str.isspace, the same whitespace as str.split()


@functools.cache
def _punctuation() -> dict[int, None]:
    """str.translate table deleting every Unicode punctuation character (built once per process, ~0.3 s)."""
    return dict.fromkeys(cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "P")


def normalized_words(text: str) -> list[str]:
    """The normalised words of ``text`` (see the module docstring)."""
    return text.translate(_punctuation()).lower().split()


def word_spans(text: str) -> tuple[list[str], list[int], list[int]]:
    """The same words as ``normalized_words``, with the [start, end) character span of each word's token (the
    whitespace-delimited run it comes from, punctuation included)."""
    table = _punctuation()
    words: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for m in _TOKEN.finditer(text):
        word = m.group().translate(table).lower()
        if word:
            words.append(word)
            starts.append(m.start())
            ends.append(m.end())
    return words, starts, ends


def hash_words(words: Sequence[str]) -> np.ndarray:
    return np.fromiter((xxhash.xxh3_64_intdigest(w) for w in words), dtype=np.uint64, count=len(words))


def _mix(z: np.ndarray) -> np.ndarray:
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of ``n`` consecutive words: element i covers words i .. i+n-1 (empty if fewer words)."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = word_hashes[:m].copy()
    for j in range(1, n):
        acc *= _P
        acc += word_hashes[j : j + m]
    return _mix(acc)


def text_ngram_hashes(text: str, n: int) -> np.ndarray:
    return ngram_hashes(hash_words(normalized_words(text)), n)


@dataclass
class EvalSetInfo:
    """What the index knows about one eval set (it also goes into the report)."""

    name: str
    path: str
    text_key: str
    format: str
    items: int  # items read (records / non-blank lines)
    items_too_short: int  # fewer than `ngram` words: not indexed, cannot be matched
    indexed_items: int
    ngrams: int  # distinct n-grams of the set
    offset: int  # global item id = offset + item index
    span: int  # max item index + 1


class EvalIndex:
    """The eval sets' n-gram hashes (sorted) with the global id of the item each comes from."""

    def __init__(self, ngram: int, sets: list[EvalSetInfo], hashes: np.ndarray, item_ids: np.ndarray):
        self.ngram = ngram
        self.sets = sets
        self.hashes = hashes
        self.item_ids = item_ids
        self._offsets = np.array([s.offset for s in sets], dtype=np.int64)

    @classmethod
    def build(cls, eval_sets: Sequence[tuple[str, str, str]], ngram: int) -> EvalIndex:
        """Index ``(name, path, text_key)`` sets. ValueError (naming the file) for an empty set, a set with no item
        of at least ``ngram`` words, or any unreadable item."""
        sets: list[EvalSetInfo] = []
        all_hashes: list[np.ndarray] = []
        all_ids: list[np.ndarray] = []
        offset = 0
        for name, path, text_key in eval_sets:
            items = too_short = indexed = 0
            last = -1
            set_hashes: list[np.ndarray] = []
            for index, text in iter_items(path, text_key):
                items += 1
                last = index
                hashes = np.unique(text_ngram_hashes(text, ngram))
                if not len(hashes):
                    too_short += 1
                    continue
                indexed += 1
                set_hashes.append(hashes)
                all_ids.append(np.full(len(hashes), offset + index, dtype=np.uint32))
            if items == 0:
                raise ValueError(f"eval set {name!r} ({path}) is empty: no items")
            if indexed == 0:
                raise ValueError(
                    f"eval set {name!r} ({path}): none of its {items} items has {ngram} or more words, so nothing "
                    f"can be matched; lower `ngram` or drop the set"
                )
            distinct = len(np.unique(np.concatenate(set_hashes)))
            all_hashes += set_hashes
            sets.append(
                EvalSetInfo(
                    name,
                    str(path),
                    text_key,
                    detect_format(path),
                    items,
                    too_short,
                    indexed,
                    distinct,
                    offset,
                    last + 1,
                )
            )
            offset += last + 1
            if offset >= 2**32:
                raise ValueError(f"eval sets: more than 2**32 items in total ({name!r} at {path})")
        hashes = np.concatenate(all_hashes)
        ids = np.concatenate(all_ids)
        order = np.argsort(hashes, kind="stable")  # stable: ids stay ascending within one hash
        return cls(ngram, sets, hashes[order], ids[order])

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.item_ids.nbytes)

    def contains(self, query: np.ndarray) -> np.ndarray:
        """Boolean mask: which of the ``query`` hashes are in the index."""
        if not len(query):
            return np.zeros(0, dtype=bool)
        order = np.argsort(query)  # sorted queries walk the index in order: ~2.5x faster lookups (cache)
        ordered = query[order]
        pos = np.searchsorted(self.hashes, ordered)
        pos[pos == len(self.hashes)] = len(self.hashes) - 1
        mask = np.empty(len(query), dtype=bool)
        mask[order] = self.hashes[pos] == ordered
        return mask

    def items_of(self, hits: np.ndarray) -> np.ndarray:
        """The sorted distinct global item ids of the eval items containing the (indexed) n-gram hashes ``hits``."""
        left = np.searchsorted(self.hashes, hits, side="left")
        right = np.searchsorted(self.hashes, hits, side="right")
        if not len(hits):
            return np.zeros(0, dtype=np.uint32)
        return np.unique(np.concatenate([self.item_ids[a:b] for a, b in zip(left, right)]))

    def locate(self, item_ids: np.ndarray) -> list[tuple[int, int]]:
        """(set position, item index in its set) of global item ids."""
        which = np.searchsorted(self._offsets, item_ids.astype(np.int64), side="right") - 1
        return [(int(s), int(g) - int(self._offsets[s])) for s, g in zip(which, item_ids)]

    # -- cache -------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the index to ``folder`` (atomically: a temporary folder renamed into place)."""
        folder = Path(folder)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "hashes.npy", np.ascontiguousarray(self.hashes))
        np.save(tmp / "items.npy", np.ascontiguousarray(self.item_ids))
        meta = {"ngram": self.ngram, "normalisation": NORMALISATION_VERSION, "sets": [asdict(s) for s in self.sets]}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process saved the same index first
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = True) -> EvalIndex:
        folder = Path(folder)
        meta = json.loads((folder / "index.json").read_text())
        mode = "r" if mmap else None
        return cls(
            meta["ngram"],
            [EvalSetInfo(**s) for s in meta["sets"]],
            np.load(folder / "hashes.npy", mmap_mode=mode),
            np.load(folder / "items.npy", mmap_mode=mode),
        )


def fingerprint(eval_sets: Sequence[tuple[str, str, str]], ngram: int) -> str:
    """Identifies an index: the sets (name, absolute path, size, mtime, text key), n and the normalisation."""
    parts: list = [NORMALISATION_VERSION, unicodedata.unidata_version, ngram]
    for name, path, text_key in eval_sets:
        st = os.stat(path)
        parts.append([name, str(Path(path).resolve()), st.st_size, st.st_mtime_ns, text_key])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def load_or_build(eval_sets: Sequence[tuple[str, str, str]], ngram: int, cache_dir: str | Path | None) -> EvalIndex:
    """The index of ``eval_sets``: from ``cache_dir/index-<fingerprint>/`` when it is there, else built (and saved
    there when ``cache_dir`` is given)."""
    if cache_dir is None:
        return EvalIndex.build(eval_sets, ngram)
    folder = Path(cache_dir) / f"index-{fingerprint(eval_sets, ngram)}"
    if (folder / "index.json").is_file():
        return EvalIndex.load(folder)
    EvalIndex.build(eval_sets, ngram).save(folder)
    return EvalIndex.load(folder)
