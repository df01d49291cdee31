"""`kiln export-hf` of an instruction-tuned model: for every chat template the SFT builder supports, the exported
folder's tokenizer renders each training conversation, through transformers' `apply_chat_template`, to exactly
the ids the builder packed; the template is in tokenizer_config.json and chat_template.jinja; generation stops at
the template's end-of-turn token; the exported model loads in transformers and generates. On SmolLM2-135M-Instruct
the exported model's logits equal the original's. The SFT build's tokenizer is the default for a checkpoint of an
SFT run, and a wrong or missing tokenizer folder is an error that names it."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.cli import main
from kiln.config import build_dataclass, to_dict
from kiln.data_pipeline.sft.build import build_sft
from kiln.data_pipeline.sft.config import SFTDataConfig
from kiln.data_pipeline.sft.dataset import SFTPackedDataset
from kiln.data_pipeline.sft.templates import AGENTLM_SYSTEM_PROMPT, BUILTIN
from kiln.data_pipeline.sft.testing import smollm2_tokenizer, tiny_tokenizer
from kiln.pretrain.config import ModelConfig
from kiln.pretrain.hf_io import export_hf, save_model
from kiln.pretrain.model import KilnLlama

CONVERSATIONS = [
    [  # a system turn and two exchanges
        {"role": "system", "content": "You are a fox expert."},
        {"role": "user", "content": "Task 1: find the fox."},
        {"role": "assistant", "content": "Thought: I should look. Action: search[fox]"},
        {"role": "user", "content": "Observation: a fox is an animal."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
    ],
    [  # no system turn: Llama-2-chat puts AgentLM's system prompt in
        {"role": "user", "content": "Hello! How are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
    ],
    [  # three exchanges
        {"role": "user", "content": "List files."},
        {"role": "assistant", "content": "Action: ls -la"},
        {"role": "user", "content": "Observation: a.py"},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "Done?"},
        {"role": "assistant", "content": "Done."},
    ],
]

# ChatML with a default system prompt: the tokenizer's own template, read from its config (data.template: auto)
OWN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
    "{% endif %}" + BUILTIN["chatml"]
)
# a Zephyr-like template from a .jinja file: turns end with the EOS token, headers are plain text
JINJA_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
UNK, BOS, EOS, IM_START, IM_END = range(5)  # the tiny tokenizer's special tokens


def build(tmp_path, tokenizer, template: str = "auto"):
    """An SFT build of CONVERSATIONS (one general source, each conversation once) -> its output folder."""
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    data = {
        "tokenizer": str(tokenizer),
        "template": template,
        "output_dir": str(tmp_path / "sft"),
        "seq_length": 255,
        "too_long": "drop",
        "heldout_fraction": 0.0,
        "sources": [{"name": "chat", "role": "general", "format": "openai", "paths": [str(source)]}],
        "mix": {"eta": 0.0},
    }
    report = build_sft(build_dataclass(SFTDataConfig, data, source="test"), False)
    assert report["kept"] == len(CONVERSATIONS), report["dropped"]
    return tmp_path / "sft"


def packed_conversations(output_dir) -> list[list[int]]:
    """Every conversation of the packed training set, as the builder wrote its ids."""
    data = SFTPackedDataset(output_dir / "train")
    out = []
    for i in range(len(data)):
        values, lengths = data.tokens.document(i)
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        out += [values[a:b].tolist() for a, b in zip(starts, starts[1:])]
    return out


def rendered_by_transformers(folder) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [list(tok.apply_chat_template(m, tokenize=True, return_dict=False)) for m in CONVERSATIONS]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny KilnLlama (room for the tiny tokenizer's 428 tokens) saved as a kiln model directory."""
    cfg = ModelConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, attention_backend="sdpa",
        fused_kernels=False,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("tiny_kiln")
    save_model(KilnLlama(cfg, init_seed=0), cfg, out)
    return out


# template case -> (data.template, the tokenizer's own template, the template source, generation eos_token_id)
CASES = {
    "tokenizer_own": ("auto", OWN_TEMPLATE, OWN_TEMPLATE, [EOS, IM_END]),
    "chatml": ("chatml", None, BUILTIN["chatml"], [EOS, IM_END]),
    "llama2": ("llama2", None, BUILTIN["llama2"], EOS),
    "jinja_file": ("FILE", None, JINJA_TEMPLATE, EOS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_tokenizer_renders_the_trained_ids(case, tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    spec, own, source, eos = CASES[case]
    if spec == "FILE":
        spec = str(tmp_path / "zephyr.jinja")
        (tmp_path / "zephyr.jinja").write_text(JINJA_TEMPLATE)
    sft = build(tmp_path, tiny_tokenizer(tmp_path / "tok", chat_template=own), spec)
    out = tmp_path / "hf"
    assert main(["export-hf", str(tiny_model_dir), "--out", str(out), "--tokenizer", str(sft / "tokenizer")]) == 0
    assert f"tokenizer from {sft / 'tokenizer'}, with chat template" in capsys.readouterr().out

    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == source
    assert (out / "chat_template.jinja").read_text() == source
    ours, theirs = packed_conversations(sft), rendered_by_transformers(out)
    assert sorted(ours) == sorted(theirs)  # each conversation exactly once, id for id
    system, plain, _ = theirs
    if case == "llama2":  # <s>[INST] <<SYS>> AgentLM's prompt <</SYS>> ... [/INST] answer </s>, per exchange
        assert system[0] == BOS and system[-1] == EOS and system.count(BOS) == 2 and system.count(EOS) == 2
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(out).decode(plain)
        assert text.startswith(f"<s>[INST] <<SYS>>\n{AGENTLM_SYSTEM_PROMPT}\n<</SYS>>\n\nHello!")
        assert text.endswith("[/INST] I am fine, thank you. </s>")
    elif case == "jinja_file":
        assert system.count(EOS) == 5 and IM_START not in system
    else:  # ChatML: every turn opens with <|im_start|> and closes with <|im_end|> (+1: the own default system)
        extra = int(case == "tokenizer_own")
        assert system.count(IM_START) == system.count(IM_END) == 5
        assert plain.count(IM_START) == plain.count(IM_END) == 2 + extra
        assert theirs[2].count(IM_START) == theirs[2].count(IM_END) == 6 + extra
        assert system[:1] == plain[:1] == [IM_START] and system[-2] == plain[-2] == IM_END

    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.generation_config.eos_token_id == eos
    prompt = torch.tensor([system[: len(system) // 2]])
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=EOS)
    assert generated.shape == (1, prompt.shape[1] + 6)
    assert torch.equal(generated[0, : prompt.shape[1]], prompt[0])
    assert int(generated[0, prompt.shape[1] :].max()) < 512


def _training_checkpoint(path, model_dir, sft_output_dir: str):
    """A full-format training checkpoint of the tiny model whose recipe trained on ``sft_output_dir``."""
    from kiln.pretrain.callbacks.base import TrainState
    from kiln.pretrain.checkpoint import save_full_state, save_train_state
    from kiln.pretrain.hf_io import load_model

    model, cfg = load_model(model_dir)
    meta = {"model": to_dict(cfg), "recipe": {"sft": {"output_dir": sft_output_dir, "template": "chatml"}}}
    save_full_state(path, dict(model.named_parameters()), None, meta)
    save_train_state(path, TrainState(step=7))
    return path


def test_sft_checkpoint_exports_its_builds_tokenizer_by_default(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's output_dir is relative, as the run saw it
    sft = build(tmp_path, tiny_tokenizer(tmp_path / "tok"), "chatml")
    ckpt = _training_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000007", tiny_model_dir, "sft")
    out = tmp_path / "hf"
    assert main(["export-hf", str(ckpt), "--out", str(out)]) == 0
    assert "tokenizer from sft/tokenizer, with chat template, generation stops at ids [2, 4]" in capsys.readouterr().out
    assert (out / "chat_template.jinja").read_text() == BUILTIN["chatml"]
    assert sorted(rendered_by_transformers(out)) == sorted(packed_conversations(sft))

    (sft / "tokenizer").rename(tmp_path / "elsewhere")
    assert main(["export-hf", str(ckpt), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert "sft/tokenizer has no tokenizer.json" in err and "kiln data sft" in err and "--tokenizer" in err
    assert not (tmp_path / "hf2").exists()  # failed before anything was written
    assert main(["export-hf", str(ckpt), "--out", str(tmp_path / "hf3"), "--tokenizer", "elsewhere"]) == 0
    assert (tmp_path / "hf3" / "chat_template.jinja").read_text() == BUILTIN["chatml"]


def test_a_tokenizer_folder_without_tokenizer_json_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "not_a_tokenizer"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "hf"
    assert main(["export-hf", str(tiny_model_dir), "--out", str(out), "--tokenizer", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer {folder}: {folder} has no tokenizer.json" in err
    assert not out.exists()
    assert main(["export-hf", str(tiny_model_dir), "--out", str(out), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} is not a directory" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    cfg = ModelConfig(
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, fused_kernels=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="428 tokens, but the model's vocabulary has 300"):
        export_hf(KilnLlama(cfg, init_seed=0), cfg, tmp_path / "hf", tokenizer=tiny_tokenizer(tmp_path / "tok"))
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def smol_tokenizer_folder(request, tmp_path_factory):
    try:
        cache = request.config.cache.mkdir("kiln-sft-tokenizers")  # shared with test_sft_labels' conversion
    except AttributeError:
        cache = tmp_path_factory.mktemp("tokenizers")
    try:
        return smollm2_tokenizer(cache)
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"SmolLM2 not available: {e}")


def test_smollm2_sft_export_keeps_the_logits_and_its_own_template(tmp_path, smol_tokenizer_folder):
    """SmolLM2-135M-Instruct (loaded once per process, shared with test_hf_io) exported with the tokenizer of an
    SFT build on its own template: transformers renders the packed ids, the logits on them equal the
    original's, and greedy generation from the chat prompt is the original's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.pretrain.testing import smollm2_reference

    hf, model, cfg = smollm2_reference()
    sft = build(tmp_path, smol_tokenizer_folder)  # template auto: SmolLM2's own ChatML
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer=sft / "tokenizer")
    source = json.loads((sft / "tokenizer" / "tokenizer_config.json").read_text())["chat_template"]
    assert "You are a helpful AI assistant named SmolLM" in source  # SmolLM2's template, not a built-in
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == source
    ours, theirs = packed_conversations(sft), rendered_by_transformers(out)
    assert sorted(ours) == sorted(theirs)
    assert theirs[1][:2] == [1, 9690] and theirs[1][-2:] == [2, 198]  # <|im_start|>system ... <|im_end|>\n
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|> is EOS

    again = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([theirs[0]])
    with torch.no_grad():
        diff = (again(x).logits - hf(x).logits).abs().max().item()
    assert diff < 1e-4, diff
    prompt = AutoTokenizer.from_pretrained(out).apply_chat_template(
        CONVERSATIONS[1][:1], add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    assert prompt[0, -4:].tolist() == [1, 520, 9531, 198]  # <|im_start|>assistant\n: the model answers next
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
        got = again.generate(prompt, max_new_tokens=8, do_sample=False)
    assert got.shape[1] > prompt.shape[1]
    assert got.tolist() == want.tolist()


def test_a_model_saved_with_its_tokenizer_exports_it_with_the_template_in_the_config(tmp_path, capsys):
    """No SFT build and no --tokenizer: the tokenizer stored with the model, as before, and transformers' own
    save (which may keep the template in chat_template.jinja only) gets the template into the config too."""
    from transformers import AutoTokenizer

    cfg = ModelConfig(
        vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, fused_kernels=False,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path / "tok", chat_template=BUILTIN["chatml"]))
    save_model(KilnLlama(cfg, init_seed=0), cfg, tmp_path / "kiln", tokenizer=tok)
    assert main(["export-hf", str(tmp_path / "kiln"), "--out", str(tmp_path / "hf")]) == 0
    assert "generation stops at ids [2, 4]" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == BUILTIN["chatml"]
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == BUILTIN["chatml"]
    assert main(["export-hf", str(tmp_path / "kiln"), "--out", str(tmp_path / "bare"), "--no-tokenizer"]) == 0
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "bare" / "generation_config.json").read_text())["eos_token_id"] == 2
