"""One small tokenizer interface over sentencepiece models (ours) and Hugging Face tokenizers (imported models).

Everything downstream (tokenization into indexed datasets, the trainer's checks, `inspect`) talks to a
`Tokenizer`: ``encode``/``encode_batch``/``decode``, the special ids ``bos_id``/``eos_id``/``pad_id``,
``vocab_size`` and a ``fingerprint`` of the vocabulary. Two tokenizers with the same fingerprint map every id
to the same piece, so data tokenized with one can be trained on with the other (our sentencepiece model and
its Hugging Face export share a fingerprint).

What `load_tokenizer(path)` accepts:

- a sentencepiece ``*.model`` file, or a directory written by ``kiln data train-tokenizer`` (it holds
  ``tokenizer.model`` and ``kiln_tokenizer.json`` describing the special tokens);
- a Hugging Face ``tokenizer.json`` file, or a Hugging Face model directory holding ``tokenizer.json`` (special
  tokens are read from ``tokenizer_config.json`` / ``special_tokens_map.json`` when present), or one holding only
  a sentencepiece ``tokenizer.model``.

A tokenizer without a BOS token (GPT-2 style) uses its EOS token as BOS, the GPT-2 convention of separating
documents with ``<|endoftext|>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from kiln.config import ConfigError

SPM_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
KILN_SPECIALS_FILE = "kiln_tokenizer.json"

# sentencepiece decodes the meta symbol U+2581 as a space, so a literal U+2581 in the text would not survive a
# round trip. We encode it as its three UTF-8 byte pieces instead (byte-fallback models have them).
_SPM_SPACE = "\u2581"
_SPM_SPACE_BYTES = ("<0xE2>", "<0x96>", "<0x81>")

_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|im_start|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class TokenizeError(ConfigError):
    """A tokenizer or tokenized-data problem, phrased for the person running the command."""


class TokenizerNotFoundError(TokenizeError):
    """The tokenizer file or directory does not exist or holds no tokenizer we can read."""


class Tokenizer(ABC):
    """The interface the data pipeline and the trainer use. Ids are plain ints; no special tokens are added by
    ``encode`` (callers add BOS/EOS themselves so that loss masks line up)."""

    path: str
    kind: str
    # Special ids, resolved by each implementation's constructor.
    _bos: int
    _eos: int
    _pad: int | None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included (the embedding table needs at least this many rows)."""

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    @abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts at once (the fast path); no BOS/EOS added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text; special (control) tokens are dropped."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str: ...

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """True for control tokens (BOS/EOS/pad/unk and the like) that ``decode`` drops."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the id -> piece table and the special ids: equal fingerprints mean interchangeable ids."""
        h = hashlib.sha256()
        h.update(json.dumps([self.vocab_size, self.bos_id, self.eos_id, self.pad_id]).encode())
        for i in range(self.vocab_size):
            h.update(self.id_to_piece(i).encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return "sha256:" + h.hexdigest()

    def describe(self) -> dict:
        """What a dataset's ``.meta.json`` records about the tokenizer that wrote it."""
        return {
            "path": os.path.abspath(self.path),
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    # Pickled by path (datatrove ships pipeline steps to worker processes).
    def __getstate__(self) -> dict:
        return {"path": self.path, "overrides": getattr(self, "_overrides", {})}

    def __setstate__(self, state: dict) -> None:
        fresh = load_tokenizer(state["path"], **state["overrides"])
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, bos: str | None = None, eos: str | None = None, pad=None):
        import sentencepiece as spm

        self.path = str(model_file)
        self._overrides = {k: v for k, v in (("bos", bos), ("eos", eos), ("pad", pad)) if v is not None}
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerNotFoundError(f"{self.path}: not a readable sentencepiece model ({e})") from None
        n = self._sp.get_piece_size()
        self._bos = self._special(bos, self._sp.bos_id(), _BOS_NAMES, "BOS")
        self._eos = self._special(eos, self._sp.eos_id(), _EOS_NAMES, "EOS")
        pad_id = self._special(pad, self._sp.pad_id(), _PAD_NAMES, "pad", required=False)
        self._pad = pad_id
        if self._bos is None:
            self._bos = self._eos
        self._control = frozenset(i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i))
        byte_ids = [self._sp.piece_to_id(p) for p in _SPM_SPACE_BYTES]
        self._space_bytes = byte_ids if all(self._sp.is_byte(i) for i in byte_ids) else None

    def _special(self, piece, default_id, names, what, required=True) -> int | None:
        if piece is not None:
            token_id = self._sp.piece_to_id(piece)
            if self._sp.id_to_piece(token_id) != piece:
                raise TokenizeError(f"{self.path}: {what} token {piece!r} is not in the vocabulary")
            return token_id
        if default_id >= 0:
            return default_id
        for name in names:
            token_id = self._sp.piece_to_id(name)
            if self._sp.id_to_piece(token_id) == name and not self._sp.is_unknown(token_id):
                return token_id
        if required and what == "EOS":
            raise TokenizeError(f"{self.path}: the model has no EOS token; pass eos='<piece>' explicitly")
        return None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        texts = list(texts)
        out = self._sp.encode(texts, num_threads=num_threads)
        if self._space_bytes is not None:
            for i, text in enumerate(texts):
                if _SPM_SPACE in text:
                    out[i] = self._encode_with_meta_space(text)
        return out

    def _encode_with_meta_space(self, text: str) -> list[int]:
        parts = self._sp.encode(text.split(_SPM_SPACE))
        ids = list(parts[0])
        for part in parts[1:]:
            ids.extend(self._space_bytes)
            ids.extend(part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._control

    @property
    def model_proto(self) -> bytes:
        return self._sp.serialized_model_proto()


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``)."""

    kind = "huggingface"

    def __init__(self, tokenizer_file: str | os.PathLike, bos: str | None = None, eos: str | None = None, pad=None):
        from tokenizers import Tokenizer as _HF

        self.path = str(tokenizer_file)
        self._overrides = {k: v for k, v in (("bos", bos), ("eos", eos), ("pad", pad)) if v is not None}
        try:
            self._tok = _HF.from_file(self.path)
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise TokenizerNotFoundError(f"{self.path}: not a readable Hugging Face tokenizer.json ({e})") from None
        if (Path(self.path).parent / KILN_SPECIALS_FILE).is_file():
            # our export: control tokens in raw text stay text, as in the sentencepiece model (this switch is a
            # runtime setting that tokenizer.json does not store)
            self._tok.encode_special_tokens = True
        config = _read_hf_special_config(Path(self.path).parent)
        self._eos = self._special(eos or config.get("eos_token"), _EOS_NAMES, "EOS", required=True)
        bos_id = self._special(bos or config.get("bos_token"), _BOS_NAMES, "BOS", required=False)
        self._bos = self._eos if bos_id is None else bos_id
        self._pad = self._special(pad or config.get("pad_token"), _PAD_NAMES, "pad", required=False)
        self._special_ids = frozenset(
            token_id for token_id, added in self._tok.get_added_tokens_decoder().items() if added.special
        )

    def _special(self, piece, names, what, required) -> int | None:
        if piece:
            token_id = self._tok.token_to_id(piece)
            if token_id is None:
                raise TokenizeError(f"{self.path}: {what} token {piece!r} is not in the vocabulary")
            return token_id
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if required:
            raise TokenizeError(
                f"{self.path}: cannot tell which token is {what} (no tokenizer_config.json and none of "
                f"{list(names)} in the vocabulary); pass {what.lower()}='<token>' explicitly"
            )
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # tokenizers parallelises batches itself (RAYON_NUM_THREADS); num_threads is sentencepiece's knob.
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        return "" if piece is None else piece

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids


def _read_hf_special_config(folder: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json or special_tokens_map.json (either may be absent)."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                found[key] = value
    return found


def load_tokenizer(
    path: str | os.PathLike | Tokenizer, bos: str | None = None, eos: str | None = None, pad: str | None = None
) -> Tokenizer:
    """Open a tokenizer (see the module docstring for what ``path`` may be); ``bos``/``eos``/``pad`` override the
    special tokens by their piece text."""
    if isinstance(path, Tokenizer):
        return path
    p = Path(path)
    if not p.exists():
        raise TokenizerNotFoundError(
            f"tokenizer not found: {p} (expected a sentencepiece .model file, a tokenizer.json, a directory "
            f"from `kiln data train-tokenizer`, or a Hugging Face model directory)"
        )
    if p.is_dir():
        if (p / KILN_SPECIALS_FILE).is_file():
            return _load_kiln_dir(p, bos, eos, pad)
        if (p / HF_TOKENIZER_FILE).is_file():
            return HFTokenizer(p / HF_TOKENIZER_FILE, bos, eos, pad)
        if (p / SPM_MODEL_FILE).is_file():
            return SentencePieceTokenizer(p / SPM_MODEL_FILE, bos, eos, pad)
        raise TokenizerNotFoundError(
            f"{p}: directory holds no tokenizer ({KILN_SPECIALS_FILE}, {HF_TOKENIZER_FILE} or {SPM_MODEL_FILE})"
        )
    if p.name == KILN_SPECIALS_FILE:
        return _load_kiln_dir(p.parent, bos, eos, pad)
    if p.suffix == ".json":
        return HFTokenizer(p, bos, eos, pad)
    return SentencePieceTokenizer(p, bos, eos, pad)


def _load_kiln_dir(folder: Path, bos, eos, pad) -> SentencePieceTokenizer:
    try:
        specials = json.loads((folder / KILN_SPECIALS_FILE).read_text())
    except ValueError as e:
        raise TokenizerNotFoundError(f"{folder / KILN_SPECIALS_FILE}: invalid JSON ({e})") from None
    model = folder / specials.get("model_file", SPM_MODEL_FILE)
    if not model.is_file():
        raise TokenizerNotFoundError(f"{folder}: {KILN_SPECIALS_FILE} names {model.name}, which does not exist")
    pieces = {k: (specials.get(k) or {}).get("piece") for k in ("bos", "eos", "pad")}
    tok = SentencePieceTokenizer(model, bos or pieces["bos"], eos or pieces["eos"], pad or pieces["pad"])
    tok.path = str(folder)
    return tok


def sentencepiece_to_hf(model_file: str | os.PathLike):
    """Convert one of our sentencepiece models (identity normalisation, no dummy prefix, byte fallback) into an
    equivalent Hugging Face ``tokenizers.Tokenizer``: same ids for the same text, same vocabulary fingerprint.

    Control symbols (BOS/EOS/pad) become special tokens that are *not* matched in raw text (as in
    sentencepiece) while ``encode_special_tokens`` is on; tokenizer.json does not store that switch, so a bare
    ``Tokenizer.from_file`` matches a literal ``<s>`` in text (as Llama's HF tokenizer does); `HFTokenizer`
    turns it back on when ``kiln_tokenizer.json`` sits beside the file. User-defined symbols (chat tokens) are
    always matched, as in sentencepiece.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as _HF

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise TokenizeError(
            f"{model_file}: only models trained with identity normalisation, no dummy prefix and no whitespace "
            f"removal (what `kiln data train-tokenizer` writes) can be converted exactly"
        )
    unk = proto.pieces[spec.unk_id].piece
    normal, user_defined, control = 1, 4, 3
    if spec.model_type == 2:  # BPE: merge priority = score of the merged piece = its rank in the vocabulary
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        merges = []
        for i, p in enumerate(proto.pieces):
            if p.type != normal or len(p.piece) < 2:
                continue
            for k in range(1, len(p.piece)):
                left, right = p.piece[:k], p.piece[k:]
                if left in vocab and right in vocab:
                    merges.append((i, vocab[left], vocab[right], left, right))
        merges.sort()
        model = models.BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in merges],
            unk_token=unk,
            byte_fallback=spec.byte_fallback,
            fuse_unk=True,
        )
    elif spec.model_type == 1:  # unigram
        model = models.Unigram(
            [(p.piece, p.score) for p in proto.pieces], unk_id=spec.unk_id, byte_fallback=spec.byte_fallback
        )
    else:
        raise TokenizeError(f"{model_file}: only BPE and unigram sentencepiece models can be converted")
    tok = _HF(model)
    tok.normalizer = normalizers.Replace(" ", _SPM_SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens(
        [AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == user_defined]
    )
    tok.add_special_tokens(
        [AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces if p.type == control]
    )
    tok.encode_special_tokens = True  # raw "<s>" in text stays text, like sentencepiece control symbols
    return tok
