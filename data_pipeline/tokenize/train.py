"""Train a sentencepiece tokenizer (`kiln data train-tokenizer`).

The model is trained so that tokenization is lossless: identity normalisation (no NFKC), no dummy prefix, no
whitespace collapsing, and byte fallback (any character outside the vocabulary becomes its UTF-8 bytes). So
``decode(encode(text)) == text`` for every text, and a text cut into segments encodes to the concatenation of
the segments' ids, which is how loss masks over metadata prefixes and prompts line up exactly.

Special tokens: ``<unk>`` = 0, BOS ``<s>`` = 1, EOS ``</s>`` = 2, pad ``<pad>`` = 3 (control symbols: never
produced from raw text), then the chat-template tokens (``<|im_start|>``, ``<|im_end|>``) and any other
user-defined symbols (always encoded as one token when they appear in text).

Determinism: the inputs are read in sorted order and sentencepiece's sampler is seeded, so the same inputs and
config (``num_threads`` included: sentencepiece's multi-threaded trainer is deterministic per thread count)
give a byte-identical model.

Output directory: ``tokenizer.model`` (sentencepiece), ``kiln_tokenizer.json`` (special tokens, fingerprint,
training config) and ``tokenizer.json`` (the same tokenizer for Hugging Face ``tokenizers``, same ids).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kiln.data_pipeline.tokenize.tokenizer import (
    HF_TOKENIZER_FILE,
    KILN_SPECIALS_FILE,
    SPM_MODEL_FILE,
    TokenizeError,
    load_tokenizer,
    sentencepiece_to_hf,
)
from kiln.logs import is_verbose

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".jsonl.zst")


class EmptyCorpusError(TokenizeError):
    """No text to train on or to tokenize."""


@dataclass
class TokenizerTrainConfig:
    inputs: list[str]
    output_dir: str
    vocab_size: int = 32000
    model_type: Literal["bpe", "unigram"] = "bpe"
    text_key: str = "text"
    # Sentences (lines) sentencepiece samples for training; 0 = use every line.
    max_sentences: int = 2_000_000
    # Long lines are cut into pieces of at most this many characters (sentencepiece skips longer "sentences").
    max_sentence_chars: int = 1024
    character_coverage: float = 0.9995
    split_digits: bool = False
    seed: int = 0
    num_threads: int = 4
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    chat_tokens: list[str] = field(default_factory=lambda: ["<|im_start|>", "<|im_end|>"])
    user_defined_symbols: list[str] = field(default_factory=list)
    export_hf: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one JSONL/text file or folder")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size {self.vocab_size}: byte fallback alone needs 256 ids; use >= 300")
        if self.max_sentences < 0:
            raise ValueError("max_sentences must be >= 0 (0 = all)")
        if self.max_sentence_chars < 16:
            raise ValueError("max_sentence_chars must be >= 16")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError("character_coverage must be in [0.9, 1.0]")
        if self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        specials = [self.unk_piece, self.bos_piece, self.eos_piece, self.pad_piece]
        extra = list(self.chat_tokens) + list(self.user_defined_symbols)
        dupes = {s for s in specials + extra if (specials + extra).count(s) > 1}
        if dupes:
            raise ValueError(f"special tokens must be distinct, repeated: {sorted(dupes)}")


def expand_inputs(inputs: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Files and folders -> a sorted list of files (folders searched recursively for ``suffixes``)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
            if not found:
                raise EmptyCorpusError(f"{p}: folder holds no input files (looked for {', '.join(suffixes)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise TokenizeError(f"input not found: {p}")
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_texts(files: list[Path], text_key: str = "text") -> Iterator[str]:
    """Documents' texts: one per JSON line for JSONL files, the whole file for text files."""
    for path in files:
        is_jsonl = path.name.endswith(JSONL_SUFFIXES) or path.suffix == ".json"
        with _open_text(path) as f:
            if not is_jsonl:
                yield f.read()
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise TokenizeError(f"{path}:{lineno}: invalid JSON ({e})") from None
                text = record.get(text_key) if isinstance(record, dict) else None
                if isinstance(text, str):
                    yield text


def iter_sentences(texts: Iterator[str], max_chars: int) -> Iterator[str]:
    """Training "sentences": non-empty lines, long ones cut into ``max_chars`` pieces."""
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), max_chars):
                yield line[start : start + max_chars]


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train, write the output directory, return it. Raises `EmptyCorpusError` when the inputs hold no text."""
    import sentencepiece as spm

    cfg.validate()
    files = expand_inputs(cfg.inputs, JSONL_SUFFIXES + TEXT_SUFFIXES)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    counts = {"documents": 0, "sentences": 0}

    def sentences() -> Iterator[str]:
        for text in iter_texts(files, cfg.text_key):
            counts["documents"] += 1
            for sentence in iter_sentences(iter([text]), cfg.max_sentence_chars):
                counts["sentences"] += 1
                yield sentence

    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=cfg.split_digits,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=cfg.max_sentence_chars * 4,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=cfg.unk_piece,
            bos_piece=cfg.bos_piece,
            eos_piece=cfg.eos_piece,
            pad_piece=cfg.pad_piece,
            user_defined_symbols=list(cfg.chat_tokens) + list(cfg.user_defined_symbols),
            num_threads=cfg.num_threads,
            # sentencepiece logs hundreds of INFO lines per training to stderr; errors only unless `kiln -v`. (The
            # level is not part of the model: the same bytes either way.)
            minloglevel=0 if is_verbose() else 2,
        )
    except RuntimeError as e:
        if counts["sentences"] == 0:
            raise EmptyCorpusError(
                f"no text in {len(files)} input file(s) (JSONL records need a string '{cfg.text_key}' field)"
            ) from None
        hint = " Use a smaller --vocab-size or more text." if "vocab" in str(e).lower() else ""
        raise TokenizeError(f"sentencepiece training failed: {str(e).rstrip('.')}.{hint}") from None
    if counts["sentences"] == 0:
        raise EmptyCorpusError(f"no text in {len(files)} input file(s)")

    _atomic_write(out / SPM_MODEL_FILE, model.getvalue())
    tok = load_tokenizer(out / SPM_MODEL_FILE)
    specials = {
        "format": "kiln-tokenizer-v1",
        "type": "sentencepiece",
        "model_file": SPM_MODEL_FILE,
        "model_type": cfg.model_type,
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint,
        "unk": {"piece": cfg.unk_piece, "id": 0},
        "bos": {"piece": cfg.bos_piece, "id": tok.bos_id},
        "eos": {"piece": cfg.eos_piece, "id": tok.eos_id},
        "pad": {"piece": cfg.pad_piece, "id": tok.pad_id},
        "chat_tokens": {t: tok._sp.piece_to_id(t) for t in cfg.chat_tokens},
        "user_defined_symbols": {t: tok._sp.piece_to_id(t) for t in cfg.user_defined_symbols},
        "lossless": True,
        "trained_on": {"files": [str(f) for f in files], **counts},
        "config": dataclasses.asdict(cfg),
    }
    if cfg.export_hf:
        sentencepiece_to_hf(out / SPM_MODEL_FILE).save(str(out / HF_TOKENIZER_FILE))
        specials["hf_tokenizer_file"] = HF_TOKENIZER_FILE
    _atomic_write(out / KILN_SPECIALS_FILE, (json.dumps(specials, indent=2) + "\n").encode())
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
