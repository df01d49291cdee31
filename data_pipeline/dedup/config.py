"""Typed configuration of the dedup steps (exact, URL and MinHash-LSH fuzzy dedup)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class MinhashConfig:
    """MinHash-LSH fuzzy dedup.

    A document is cut into word ``ngram``-shingles of its normalised text; ``buckets * hashes_per_bucket`` min-wise
    hashes make its signature, split into ``buckets`` bands of ``hashes_per_bucket`` rows. Two documents become a
    candidate pair when any band is identical, which happens with probability ``1 - (1 - J**rows)**buckets`` for
    Jaccard similarity J: 14 x 8 (FineWeb's setting) catches ~92% of pairs at J = 0.8 and ~99.5% at J = 0.85; the
    S-curve's midpoint is near (1/14)**(1/8) ~ 0.72.

    ``verify_threshold``: candidate pairs whose signature-estimated Jaccard (fraction of equal min-hashes over all
    ``buckets * hashes_per_bucket`` hashes) is below it are discarded. This removes the low-similarity pairs the
    banding lets through (~21% of pairs at J = 0.6 with 14 x 8) at a small recall cost near the threshold. ``None``
    keeps every candidate pair (datatrove/FineWeb behaviour).

    ``workers_per_bucket`` splits each band's hash range over that many tasks, so that a task holds only
    ``1/workers_per_bucket`` of one band's hashes in memory.
    """

    ngram: int = 5  # words per shingle
    buckets: int = 14  # LSH bands
    hashes_per_bucket: int = 8  # min-hashes per band
    seed: int = 1  # seed of the hash functions (the same seed gives the same signatures)
    verify_threshold: float | None = 0.7  # drop candidate pairs whose estimated Jaccard is below it (null: keep all)
    workers_per_bucket: int = 1  # tasks sharing one band's hash range (memory per task: 1/this)
    # text normalisation before shingling (same meaning as datatrove's TextNormConfig)
    lowercase: bool = True
    remove_punctuation: bool = True  # delete punctuation before shingling
    norm_numbers: bool = True  # replace digits by 0 before shingling
    norm_diacritics: bool = True  # strip accents before shingling

    @property
    def num_hashes(self) -> int:
        return self.buckets * self.hashes_per_bucket

    def validate(self) -> None:
        for name in ("ngram", "buckets", "hashes_per_bucket", "workers_per_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.buckets > 999:
            raise ValueError(f"buckets must be <= 999, got {self.buckets}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.verify_threshold is not None and not 0.0 < self.verify_threshold <= 1.0:
            raise ValueError(f"verify_threshold must be in (0, 1] or null, got {self.verify_threshold}")


@dataclass
class DedupConfig:
    """Which dedup kinds run, and how text and URLs are normalised before hashing.

    Exact dedup hashes the content after collapsing whitespace runs to one space and stripping the ends
    (``exact_collapse_whitespace``) and lowercasing (``exact_lowercase``). URL dedup hashes
    ``doc.metadata["url"]`` after dropping the scheme, a leading ``www.``, the fragment, default ports and trailing
    slashes and lowercasing the host (the path keeps its case); ``url_drop_query`` also drops the query string.

    A document that is several kinds of duplicate is counted once, with precedence exact > url > minhash.
    """

    exact: bool = True  # drop documents whose normalised content equals an earlier one's
    url: bool = True  # drop documents whose normalised URL equals an earlier one's
    minhash: MinhashConfig | None = field(default_factory=MinhashConfig)
    exact_lowercase: bool = True  # exact dedup compares lowercased text
    exact_collapse_whitespace: bool = True  # exact dedup collapses whitespace runs and strips the ends
    url_drop_query: bool = False  # URL dedup also ignores the query string

    def validate(self) -> None:
        # minhash checks itself: kiln.config.validate_tree runs each hook once (the dedup steps call it too).
        if not (self.exact or self.url or self.minhash is not None):
            raise ValueError("enable at least one of exact, url, minhash")

    def fingerprint(self) -> dict:
        """What the signature files depend on; later stages refuse signatures made with another config."""
        mh = self.minhash
        return {
            "exact": self.exact,
            "url": self.url,
            "exact_lowercase": self.exact_lowercase,
            "exact_collapse_whitespace": self.exact_collapse_whitespace,
            "url_drop_query": self.url_drop_query,
            "minhash": None
            if mh is None
            else {k: v for k, v in asdict(mh).items() if k not in ("verify_threshold", "workers_per_bucket")},
        }
