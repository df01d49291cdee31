"""`kiln data train-tokenizer`, `kiln data tokenize` (`kiln data inspect PREFIX` decodes the result).

Heavy imports (sentencepiece, datatrove, megatron-core) happen inside the commands, so `kiln --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

TRAIN_EPILOG = """\
examples:
  kiln data train-tokenizer data/web/*.jsonl.gz -o tok/ --vocab-size 32000
  kiln data train-tokenizer corpus.txt -o tok/ --model-type unigram --chat-tokens "<|im_start|>" "<|im_end|>"

Writes tok/tokenizer.model (sentencepiece), tok/kiln_tokenizer.json (special tokens, fingerprint) and
tok/tokenizer.json (the same tokenizer for Hugging Face). Tokenization is lossless: decode(encode(text)) == text.
Same inputs and options -> byte-identical model."""

TOKENIZE_EPILOG = """\
examples:
  kiln data tokenize data/clean/ -t tok/ -o tokens/web --tasks 8
  kiln data tokenize data/clean/ -t tok/ -o tokens/web --meco      # writes tokens/web_meco and tokens/web_plain

Output: megatron-core indexed datasets PREFIX.bin/.idx (one document = one sequence, BOS ... EOS), a parallel
loss mask PREFIX_loss_mask.bin/.idx (uint8, 1 = token is a training target) and PREFIX.meta.json (tokenizer
fingerprint, vocab size, counts). With --meco, the URL host of each document ("URL: en.wikipedia.org\\n\\n")
is prepended in PREFIX_meco with no loss on BOS and the metadata, and PREFIX_plain holds the same documents
without it, for the cooldown. Runs as a recipe's tokenize stage does (--tasks/--workers = executor.tasks/
workers); datatrove's logs and completion markers are in PREFIX.work/logs/ (an interrupted run resumes)."""


def register(data_subparsers) -> None:
    p = data_subparsers.add_parser(
        "train-tokenizer",
        help="train a sentencepiece tokenizer (BPE or unigram, byte fallback, chat tokens)",
        description="Train a lossless sentencepiece tokenizer on JSONL(.gz) or text files.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="JSONL(.gz) or .txt(.gz) files, or folders holding them")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size, specials included (default 32000)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="default: bpe")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument(
        "--max-sentences", type=int, default=2_000_000, help="lines sampled for training, 0 = all (default 2M)"
    )
    p.add_argument("--character-coverage", type=float, default=0.9995, help="default 0.9995")
    p.add_argument("--split-digits", action="store_true", help="always split numbers into single digits")
    p.add_argument(
        "--chat-tokens",
        nargs="*",
        default=["<|im_start|>", "<|im_end|>"],
        metavar="TOKEN",
        help="chat-template tokens, one id each (default: <|im_start|> <|im_end|>; give none to add none)",
    )
    p.add_argument("--user-symbols", nargs="*", default=[], metavar="TOKEN", help="more always-one-token strings")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=4, help="training threads (part of the config: default 4)")
    p.add_argument("--no-hf-export", action="store_true", help="do not also write a Hugging Face tokenizer.json")
    p.set_defaults(func=_train_tokenizer_cmd)

    t = data_subparsers.add_parser(
        "tokenize",
        help="tokenize JSONL documents into megatron-core indexed datasets (+ loss masks, optional MeCo)",
        description="Tokenize documents into the trainer's on-disk format, in parallel over files.",
        epilog=TOKENIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("inputs", nargs="+", help="JSONL(.gz/.zst) files, or folders holding them")
    t.add_argument("-t", "--tokenizer", required=True, help="tokenizer dir/file (ours or Hugging Face)")
    t.add_argument("-o", "--output", required=True, help="output prefix, e.g. tokens/web")
    t.add_argument(
        "--meco",
        action="store_true",
        help="write PREFIX_meco (metadata prefix, no loss on it) and PREFIX_plain (same documents, no prefix)",
    )
    t.add_argument(
        "--metadata",
        choices=["url_host", "url_hash", "field"],
        default="url_host",
        help="MeCo metadata: the URL host (default), a hash of it, or a metadata field (--metadata-field)",
    )
    t.add_argument("--metadata-field", default="topic", help="field for --metadata field (default: topic)")
    t.add_argument("--strip-www", action="store_true", help="URL host without a leading www.")
    t.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    t.add_argument("--url-key", default="url", help="JSONL field holding the source URL (default: url)")
    # --tasks / --workers mean what a recipe's executor.tasks / executor.workers mean: the same runner runs both
    t.add_argument("--tasks", type=int, default=1, help="parallel tasks = output shards before the merge")
    t.add_argument("--workers", type=int, default=-1, help="processes at once (default -1: min(--tasks, CPU count))")
    t.add_argument("--threads", type=int, default=1, help="sentencepiece encoding threads per task")
    t.add_argument("--batch-size", type=int, default=1000, help="documents per tokenizer call (default 1000)")
    t.add_argument("--keep-shards", action="store_true", help="do not merge; keep one dataset per task")
    t.set_defaults(func=_tokenize_cmd)


def _train_tokenizer_cmd(args) -> int:
    from kiln.data_pipeline.tokenize.tokenizer import load_tokenizer
    from kiln.data_pipeline.tokenize.train import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(
        inputs=args.inputs,
        output_dir=args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        text_key=args.text_key,
        max_sentences=args.max_sentences,
        character_coverage=args.character_coverage,
        split_digits=args.split_digits,
        chat_tokens=args.chat_tokens,
        user_defined_symbols=args.user_symbols,
        seed=args.seed,
        num_threads=args.threads,
        export_hf=not args.no_hf_export,
    )
    try:
        cfg.validate()
    except ValueError as e:
        from kiln.config import ConfigError

        raise ConfigError(str(e)) from None
    out = train_tokenizer(cfg)
    tok = load_tokenizer(out)
    print(
        f"wrote {out}: {cfg.model_type} vocab {tok.vocab_size} (bos {tok.bos_id}, eos {tok.eos_id}, "
        f"pad {tok.pad_id}), fingerprint {tok.fingerprint[:19]}"
    )
    return 0


def _jsonl_reader(inputs: list[str], text_key: str, out_dir: Path):
    from datatrove.pipeline.readers import JsonlReader

    from kiln.data_pipeline.tokenize.train import JSONL_SUFFIXES, expand_inputs

    files = [f.resolve() for f in expand_inputs(inputs, JSONL_SUFFIXES)]
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    paths_file = out_dir / "input_files.txt"
    paths_file.write_text("".join(f"{f.relative_to(root)}\n" for f in files))
    return JsonlReader(str(root), paths_file=str(paths_file), text_key=text_key), len(files)


def _tokenize_cmd(args) -> int:
    """The recipe's tokenize stages (`runner.run_tokenize`) over the given files; the reader is the difference."""
    from kiln.data_pipeline.metadata import AddMetadata, MetadataConfig
    from kiln.data_pipeline.recipe import ExecutorConfig, TokenizeStageConfig
    from kiln.data_pipeline.runner import run_tokenize
    from kiln.data_pipeline.tokenize.indexed import dataset_prefix, list_shards, meta_path, read_meta, shard_variants
    from kiln.data_pipeline.tokenize.tokenizer import TokenizeError, load_tokenizer

    executor = ExecutorConfig(kind="local", tasks=args.tasks, workers=args.workers)
    try:
        executor.validate()
    except ValueError as e:
        raise TokenizeError(f"--{e}") from None  # "--tasks must be >= 1, got 0"
    tok = load_tokenizer(args.tokenizer)  # fail before any work when the tokenizer is missing or unreadable
    out = Path(args.output)
    work = Path(f"{out}.work")
    variants = ("meco", "plain") if args.meco else (None,)
    if all(meta_path(dataset_prefix(out, v)).is_file() for v in variants) and work.exists():
        shutil.rmtree(work)  # a finished earlier run: start fresh rather than "resume" it
    work.mkdir(parents=True, exist_ok=True)
    reader, n_files = _jsonl_reader(args.inputs, args.text_key, work)
    source = [reader]
    if args.meco:  # a recipe derives the prefix in its `metadata` stage; loose files get it here
        meta_cfg = MetadataConfig(
            kind=args.metadata, url_key=args.url_key, strip_www=args.strip_www, field=args.metadata_field
        )
        source.append(AddMetadata(meta_cfg))
    cfg = TokenizeStageConfig(
        tokenizer=str(tok.path),
        output_prefix=str(out),
        meco=args.meco,
        batch_size=args.batch_size,
        num_threads=args.threads,
    )
    print(f"tokenizing {n_files} file(s) with {tok!r} in {args.tasks} task(s) -> {out}", file=sys.stderr)
    run_tokenize(source, cfg, executor, work, merge=not args.keep_shards)
    if args.keep_shards:
        for variant in shard_variants(out):
            shards = list_shards(out, variant)
            print(f"{dataset_prefix(out, variant)}: {len(shards)} shard(s): {' '.join(shards)}")
        return 0
    for prefix in (dataset_prefix(out, v) for v in variants):
        meta = read_meta(prefix)
        print(
            f"{prefix}: {meta['documents']} documents, {meta['tokens']} tokens ({meta['loss_tokens']} with loss), "
            f"{meta['token_dtype']}"
        )
    return 0
