"""Train the DCLM-style quality classifier: a fastText bigram model separating "high quality" reference text
(positives: e.g. Wikipedia, instruction data) from ordinary crawl text (negatives).

Both training and the filter (``classifier.QualityClassifierFilter``) pass text through ``normalize_text``, so
the model sees at inference exactly the tokens it was trained on. No datatrove import here: the CLI stays fast.
"""

from __future__ import annotations

import ctypes
import gzip
import io
import os
import random
import re
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TOKEN = re.compile(r"\w+|[^\w\s]")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json.gz")


def normalize_text(text: str) -> str:
    """One line of lower-cased tokens: NFKC, punctuation split off words, all whitespace (newlines too) collapsed.

    fastText splits on whitespace only, so "end." and "end" would otherwise be different words.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_TOKEN.findall(text))


@contextmanager
def _zero_filled_malloc():
    """Make glibc's malloc hand out zero-filled memory while fastText builds and trains its model.

    Why: fastText 0.9.2 (the fasttext-numpy2-wheel build included) initialises the input matrix in blocks of
    ``rows * dim / 10`` values, one block per training thread (``DenseMatrix::uniformThread``). With fewer than 10
    threads the remaining blocks are never written, so they hold whatever the heap held before: for small models
    (recycled heap memory) training is then NOT deterministic even with ``thread=1`` and a fixed seed, and often
    dies with "Encountered NaN" (we measured both). Large matrices come from fresh mmap'd pages, which are zero,
    and train deterministically. glibc's M_PERTURB option fills every malloc'd block with ``perturb ^ 0xff``;
    perturb = 0xff gives zeros, i.e. the large-model behaviour for every size. Restored right after.
    Where there is no glibc ``mallopt`` (macOS, musl, Windows) this does nothing; small models may then vary.
    glibc does not perturb blocks served from its per-thread cache (<= 1032 bytes), i.e. input matrices of fewer
    than ~256 floats, far below any useful model.
    """
    m_perturb = -6  # from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        yield
        return
    enabled = mallopt(m_perturb, 0xFF) == 1
    try:
        yield
    finally:
        if enabled:
            mallopt(m_perturb, 0)


def fasttext_train_supervised(**kwargs):
    """``fasttext.train_supervised`` with the uninitialised-memory workaround (see ``_zero_filled_malloc``)."""
    import fasttext

    with _zero_filled_malloc():
        return fasttext.train_supervised(**kwargs)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _expand(paths: list[str], role: str) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"{role} examples: folder {path} holds no files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{role} examples: file not found: {path}")
    if not files:
        raise ValueError(f"{role} examples: no input files given")
    return files


def read_examples(path: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """Texts of one file: JSONL (``.jsonl``, ``.ndjson``, ``.json.gz``, optionally gzipped), one record per line,
    text under ``text_key``; anything else is plain text, one example per non-empty line."""
    import orjson  # here, not at import: `kiln --help` registers this package's commands without the data extra

    path = Path(path)
    is_jsonl = path.name.endswith(_JSONL_SUFFIXES)
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not is_jsonl:
                yield line.rstrip("\n")
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{lineno}: no string field {text_key!r} (fields: {keys}); set --text-key")
            yield record[text_key]


def _load(paths: list[str], role: str, text_key: str) -> tuple[list[str], int]:
    texts, empty = [], 0
    for path in _expand(paths, role):
        for text in read_examples(path, text_key):
            norm = normalize_text(text)
            if norm:
                texts.append(norm)
            else:
                empty += 1
    if not texts:
        raise ValueError(f"{role} examples: no non-empty text in {', '.join(paths)}")
    return texts, empty


def _split(texts: list[str], valid_fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    texts = texts[:]
    rng.shuffle(texts)
    n_valid = int(round(len(texts) * valid_fraction))
    if valid_fraction > 0 and len(texts) > 1:
        n_valid = min(max(n_valid, 1), len(texts) - 1)  # keep at least one example on each side
    return texts[n_valid:], texts[:n_valid]


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for label, text in rows:
            f.write(f"__label__{label} {text}\n")


def train_quality_classifier(
    positive: list[str],
    negative: list[str],
    output: str,
    *,
    text_key: str = "text",
    epoch: int = 20,
    lr: float = 0.2,
    word_ngrams: int = 2,
    dim: int = 64,
    bucket: int = 500_000,
    min_count: int = 1,
    seed: int = 0,
    valid_fraction: float = 0.1,
    threads: int = 1,
    positive_label: str = "hq",
    negative_label: str = "lq",
) -> dict:
    """Train a fastText quality classifier from files of positive and negative examples and save it to ``output``.

    Each class is shuffled with ``seed`` and ``valid_fraction`` of it is held out (stratified). The fastText
    training file (``<output>.train.txt``, shuffled, normalised text) and held-out file (``<output>.valid.txt``)
    are written next to the model. ``threads=1`` makes training deterministic for a given seed.
    The model file holds ``bucket * dim`` float32 n-gram vectors: 500k x 64 is 128 MB; lower ``bucket`` for
    small corpora.

    Returns metrics on the held-out split (``positive_label`` is the positive class, predicted when its
    probability is >= 0.5): accuracy, precision, recall, f1 (None when nothing is held out), plus example counts
    and the paths written.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if positive_label == negative_label:
        raise ValueError(f"positive_label and negative_label must differ, both are {positive_label!r}")
    for name, value in (("epoch", epoch), ("word_ngrams", word_ngrams), ("dim", dim), ("bucket", bucket)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")

    pos, pos_empty = _load(positive, "positive", text_key)
    neg, neg_empty = _load(negative, "negative", text_key)
    rng = random.Random(seed)
    pos_train, pos_valid = _split(pos, valid_fraction, rng)
    neg_train, neg_valid = _split(neg, valid_fraction, rng)

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    train_file = out.with_name(out.name + ".train.txt")
    valid_file = out.with_name(out.name + ".valid.txt")
    train_rows = [(positive_label, t) for t in pos_train] + [(negative_label, t) for t in neg_train]
    rng.shuffle(train_rows)  # fastText reads the file in order: interleave the classes for SGD
    _write(train_file, train_rows)
    valid_rows = [(positive_label, t) for t in pos_valid] + [(negative_label, t) for t in neg_valid]
    _write(valid_file, valid_rows)

    try:
        model = fasttext_train_supervised(
            input=str(train_file),
            epoch=epoch,
            lr=lr,
            wordNgrams=word_ngrams,
            dim=dim,
            bucket=bucket,
            minCount=min_count,
            seed=seed,
            thread=threads,
            loss="softmax",
            verbose=0,
        )
    except RuntimeError as e:
        if "NaN" in str(e):
            raise ValueError(f"training diverged (NaN loss) at lr={lr}; use a smaller learning rate") from None
        raise
    model.save_model(str(out))

    metrics: dict = {
        "model": str(out),
        "train_file": str(train_file),
        "valid_file": str(valid_file),
        "positive_label": positive_label,
        "negative_label": negative_label,
        "train_positive": len(pos_train),
        "train_negative": len(neg_train),
        "valid_positive": len(pos_valid),
        "valid_negative": len(neg_valid),
        "skipped_empty": pos_empty + neg_empty,
        "accuracy": None,
        "precision": None,
        "recall": None,
        "f1": None,
    }
    if valid_rows:
        scores = positive_scores(model, [t for _, t in valid_rows], positive_label)
        tp = fp = tn = fn = 0
        for (label, _), score in zip(valid_rows, scores):
            predicted = score >= 0.5
            actual = label == positive_label
            tp += predicted and actual
            fp += predicted and not actual
            tn += not predicted and not actual
            fn += not predicted and actual
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        metrics.update(
            accuracy=(tp + tn) / len(valid_rows),
            precision=precision,
            recall=recall,
            f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            true_positive=tp,
            false_positive=fp,
            true_negative=tn,
            false_negative=fn,
        )
    return metrics


def positive_scores(model, normalized_texts: list[str], positive_label: str) -> list[float]:
    """Probability of ``positive_label`` for each (already normalised, single-line) text."""
    target = f"__label__{positive_label}"
    if target not in model.labels:
        raise ValueError(f"label {positive_label!r} is not in the model (labels: {model.labels})")
    labels, probs = model.predict(normalized_texts, k=-1)
    # fastText's softmax can overshoot 1.0 by ~1e-5; clip so scores read as probabilities
    return [min(1.0, float(dict(zip(lab, pr)).get(target, 0.0))) for lab, pr in zip(labels, probs)]
