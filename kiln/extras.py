"""Which optional extra provides a missing module, so a command can say what to install instead of a traceback."""

from __future__ import annotations

# top-level import name -> the kilnlm extra that installs it
EXTRA_OF_MODULE = {
    "torch": "train",
    "deepspeed": "train",
    "megatron": "train",
    "transformers": "train",
    "safetensors": "train",
    "gguf": "train",
    "accelerate": "train",
    "wandb": "train",
    "triton": "train",
    "datatrove": "data",
    "loguru": "data",
    "orjson": "data",
    "sentencepiece": "data",
    "tokenizers": "data",
    "spacy": "data",
    "py3langid": "data",
    "fasttext": "data",
    "warcio": "data",
    "trafilatura": "data",
    "xxhash": "data",
    "zstandard": "data",
    "pyarrow": "data",
    "tqdm": "data",
    "matplotlib": "data",
    "wordfreq": "data",
    "ray": "ray",
    "textworld": "agent",
    "flash_attn": "gpu",
}


def extra_for(error: ModuleNotFoundError) -> str | None:
    """The extra whose install provides the module of ``error``, or None if it is not one of ours."""
    root = (error.name or "").split(".", 1)[0]
    return EXTRA_OF_MODULE.get(root)


def missing_extra_message(command: str, error: ModuleNotFoundError) -> str | None:
    extra = extra_for(error)
    if extra is None:
        return None
    return (
        f"`kiln {command}` needs the '{extra}' extra (module '{error.name}' is not installed): "
        f'pip install "kilnlm[{extra}]"'
    )
