"""`kiln data train-quality`: train the DCLM-style fastText quality classifier used by the
``quality_classifier`` filter. fastText is imported only when the command runs."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train a fastText bigram classifier that separates high-quality reference text (--positive) from ordinary
crawl text (--negative), as in DCLM. Texts are normalised (NFKC, lower-cased, punctuation split off) exactly
as the quality_classifier filter normalises documents. Each class is shuffled and --valid-fraction of it held
out; accuracy, precision and recall on that split are printed. The fastText training file is written next
to the model (MODEL.bin.train.txt, MODEL.bin.valid.txt)."""

EPILOG = """\
input files:
  JSONL (.jsonl, .ndjson, .json.gz; gzip allowed): one record per line, the text under --text-key.
  Anything else (e.g. .txt, .txt.gz): plain text, one example per non-empty line. A folder: all files in it.
  Give several files after --positive / --negative, or repeat the option.

example:
  kiln data train-quality --positive wiki.jsonl instructions.jsonl --negative crawl.jsonl.gz \\
      --output models/quality.bin
  then in a data recipe:
    filters:
      - kind: quality_classifier
        model: models/quality.bin
        threshold: 0.5

The model file holds bucket x dim float32 vectors (default 500,000 x 64 = 128 MB); use a smaller --bucket for
small corpora. --threads 1 (default) gives the same model for the same seed and data; more threads train
faster but not reproducibly (fastText updates the model from all threads at once)."""


def register(data_subparsers: argparse._SubParsersAction) -> None:
    p = data_subparsers.add_parser(
        "train-quality",
        help="train the fastText quality classifier (DCLM-style) for the quality_classifier filter",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--positive", nargs="+", action="extend", required=True, metavar="FILE", help="positive examples")
    p.add_argument("--negative", nargs="+", action="extend", required=True, metavar="FILE", help="negative examples")
    p.add_argument("--output", required=True, metavar="MODEL.bin", help="where to save the fastText model")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default: %(default)s)")
    p.add_argument("--epoch", type=int, default=20, help="training epochs (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.2, help="learning rate (default: %(default)s)")
    p.add_argument("--word-ngrams", type=int, default=2, help="word n-gram length (default: %(default)s)")
    p.add_argument("--dim", type=int, default=64, help="vector size (default: %(default)s)")
    p.add_argument("--bucket", type=int, default=500_000, help="n-gram hash buckets (default: %(default)s)")
    p.add_argument("--min-count", type=int, default=1, help="minimal word count (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, shuffle and training (default: %(default)s)")
    p.add_argument(
        "--valid-fraction", type=float, default=0.1, help="held-out fraction of each class (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=1, help="fastText threads; 1 is deterministic (default: 1)")
    p.add_argument("--positive-label", default="hq", help="label of the positive class (default: %(default)s)")
    p.add_argument("--negative-label", default="lq", help="label of the negative class (default: %(default)s)")
    p.set_defaults(func=cmd_train_quality)


def format_metrics(metrics: dict) -> str:
    """The metrics of ``train_quality_classifier`` as an aligned two-column table."""

    def fmt(value) -> str:
        if value is None:
            return "n/a (nothing held out)"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    rows = [
        ("examples (train)", f"{metrics['train_positive']} {metrics['positive_label']} / "
         f"{metrics['train_negative']} {metrics['negative_label']}"),
        ("examples (held out)", f"{metrics['valid_positive']} {metrics['positive_label']} / "
         f"{metrics['valid_negative']} {metrics['negative_label']}"),
        ("skipped (empty)", fmt(metrics["skipped_empty"])),
        ("accuracy", fmt(metrics["accuracy"])),
        (f"precision ({metrics['positive_label']})", fmt(metrics["precision"])),
        (f"recall ({metrics['positive_label']})", fmt(metrics["recall"])),
        (f"f1 ({metrics['positive_label']})", fmt(metrics["f1"])),
        ("model", metrics["model"]),
        ("training file", metrics["train_file"]),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    lines = [f"{'metric':<{width}}  value", rule] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def cmd_train_quality(args: argparse.Namespace) -> int:
    from kiln.data_pipeline.filters.training import train_quality_classifier

    try:
        metrics = train_quality_classifier(
            args.positive,
            args.negative,
            args.output,
            text_key=args.text_key,
            epoch=args.epoch,
            lr=args.lr,
            word_ngrams=args.word_ngrams,
            dim=args.dim,
            bucket=args.bucket,
            min_count=args.min_count,
            seed=args.seed,
            valid_fraction=args.valid_fraction,
            threads=args.threads,
            positive_label=args.positive_label,
            negative_label=args.negative_label,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"kiln data train-quality: error: {e}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    return 0
