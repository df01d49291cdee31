"""The tokenizer ``kiln export-hf`` writes next to the weights, and the tokens generation stops at.

A chat model is usable as trained only if the exported tokenizer renders a conversation to the ids it was
trained on, so the chat template travels with the checkpoint: the exported ``tokenizer_config.json`` has
``chat_template`` (older transformers read the key) and the same text is in ``chat_template.jinja``
(transformers 5 reads the file first). Which tokenizer (`tokenizer_source`):

- ``--tokenizer DIR``: that folder's tokenizer files, copied unchanged (e.g. an SFT build's
  ``<output_dir>/tokenizer``, whose template is the one the data was rendered with);
- a training checkpoint of an SFT run (``meta.json``'s ``recipe.sft.output_dir``): that build's tokenizer
  folder; a missing one is an error, never a silent fall back to a tokenizer with another template;
- otherwise the tokenizer stored with the model, if any (`kiln.pretrain.hf_io.load_tokenizer`).

Generation stops at the template's end-of-turn token as well as the model's EOS (`generation_eos`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# what a tokenizer folder is made of; config.json and weights are not copied even if the folder is a model's
TOKENIZER_FILES = (
    TOKENIZER_JSON,
    TOKENIZER_CONFIG,
    TEMPLATE_FILE,
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
)
REBUILD_HINT = "rebuild it with `kiln data sft <the run's recipe>` or pass --tokenizer"


def check_tokenizer_folder(folder: str | os.PathLike, *, flag: str = "--tokenizer") -> Path:
    """``folder`` if it holds a ``tokenizer.json``, else a FileNotFoundError naming it (and the flag)."""
    path = Path(folder)
    if not (path / TOKENIZER_JSON).is_file():
        what = "is not a directory" if not path.is_dir() else f"has no {TOKENIZER_JSON}"
        raise FileNotFoundError(
            f"{flag} {folder}: {path} {what} (expected a tokenizer folder such as an SFT build's "
            f"<output_dir>/tokenizer, or a model directory saved with its tokenizer)"
        )
    return path


def sft_tokenizer_folder(checkpoint: str | os.PathLike) -> Path | None:
    """The tokenizer folder of the SFT build a training checkpoint was trained on (``meta.json``'s
    ``recipe.sft.output_dir`` + ``/tokenizer``, relative paths against the working directory as the run saw
    them), or None when ``checkpoint`` is not a training checkpoint of an SFT run."""
    from kiln.pretrain.checkpoint import META_FILE
    from kiln.pretrain.checkpoint_model import is_training_checkpoint

    if not is_training_checkpoint(checkpoint):
        return None
    meta = json.loads((Path(checkpoint) / META_FILE).read_text())
    recipe = meta.get("recipe") if isinstance(meta, dict) else None
    sft = recipe.get("sft") if isinstance(recipe, dict) else None
    output_dir = sft.get("output_dir") if isinstance(sft, dict) else None
    if not output_dir:
        return None
    folder = Path(output_dir) / "tokenizer"
    if not (folder / TOKENIZER_JSON).is_file():
        raise FileNotFoundError(
            f"{checkpoint} was trained on the SFT build {output_dir}, but its tokenizer folder {folder} has no "
            f"{TOKENIZER_JSON} (the chat template the data was rendered with): {REBUILD_HINT}"
        )
    return folder


def tokenizer_source(model_src: str, *, tokenizer: str | None, no_tokenizer: bool):
    """What `kiln.pretrain.hf_io.export_hf` gets as ``tokenizer``: a folder (copied), a transformers tokenizer
    (saved) or None (see the module docstring for the order)."""
    if no_tokenizer:
        return None
    if tokenizer is not None:
        return check_tokenizer_folder(tokenizer)
    folder = sft_tokenizer_folder(model_src)
    if folder is not None:
        return folder
    from kiln.config import ConfigError
    from kiln.pretrain.hf_io import load_tokenizer

    try:
        return load_tokenizer(model_src)
    except ConfigError:  # a model stored without a tokenizer exports without one, as before
        return None


def check_vocab(folder: str | os.PathLike, vocab_size: int) -> None:
    """A tokenizer with ids past the model's embedding would make the exported model fail on them."""
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(Path(folder) / TOKENIZER_JSON)).get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer {folder}: {n} tokens, but the model's vocabulary has {vocab_size}: not this model's tokenizer"
        )


def copy_tokenizer_folder(src: str | os.PathLike, out: str | os.PathLike) -> None:
    src, out = check_tokenizer_folder(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)


def chat_template_into_config(folder: str | os.PathLike) -> str | None:
    """Make ``tokenizer_config.json``'s ``chat_template`` and ``chat_template.jinja`` the same text (the file
    wins, as in transformers 5), so every transformers version renders with it; returns the template."""
    folder = Path(folder)
    config_path, template_path = folder / TOKENIZER_CONFIG, folder / TEMPLATE_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = template_path.read_text(encoding="utf-8") if template_path.is_file() else config.get("chat_template")
    if not isinstance(template, str) or not template:
        return None  # no template, or a list of named ones: left as they are
    if config.get("chat_template") != template:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if not template_path.is_file():
        template_path.write_text(template, encoding="utf-8")
    return template


def end_of_turn_token(folder: str | os.PathLike) -> str | None:
    """The control token that ends an assistant turn under the folder's chat template (``<|im_end|>`` for
    ChatML, ``</s>`` for Llama-2-chat): found as the SFT labeller finds the trained end of an answer, on a
    one-exchange probe conversation. None without a template, or when the template ends answers with no
    control token or cannot render the probe."""
    from kiln.data_pipeline.sft.labels import Labeller
    from kiln.data_pipeline.sft.messages import BadRecord, Conversation, Message
    from kiln.data_pipeline.sft.templates import ChatTemplate
    from kiln.data_pipeline.sft.tokenizer_files import ChatTokenizer

    tok = ChatTokenizer(folder)
    if tok.chat_template is None:
        return None
    labeller = Labeller(tok, ChatTemplate("tokenizer", tok.chat_template))
    try:
        plan = labeller.plan(Conversation([Message("user", "Hi"), Message("assistant", "Hello")]))
    except BadRecord:
        return None
    end = plan.trained[-1][1]
    return next((t for t in labeller.control if plan.full.endswith(t, 0, end)), None)


def generation_eos(folder: str | os.PathLike | None, eos: int | list[int] | None) -> int | list[int] | None:
    """``generation_config.eos_token_id``: the model's EOS plus the template's end-of-turn token.

    Why both: an SFT model is trained to close every answer with the end-of-turn token (the labeller trains
    it), which for ChatML on a tokenizer whose EOS is ``</s>`` is ``<|im_end|>``, not EOS; with EOS alone
    ``model.generate`` would run past the end of the answer into a made-up next turn. The model's own EOS stays
    so a pretrained-style ending still stops it. One id stays an int (what transformers writes for one).
    """
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if folder is not None and (Path(folder) / TOKENIZER_JSON).is_file():
        token = end_of_turn_token(folder)
        from tokenizers import Tokenizer

        turn = None if token is None else Tokenizer.from_file(str(Path(folder) / TOKENIZER_JSON)).token_to_id(token)
        if turn is not None and turn not in ids:
            ids.append(turn)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


__all__ = [
    "chat_template_into_config",
    "check_tokenizer_folder",
    "copy_tokenizer_folder",
    "end_of_turn_token",
    "generation_eos",
    "sft_tokenizer_folder",
    "tokenizer_source",
]
