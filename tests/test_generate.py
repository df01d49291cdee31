"""Generation: greedy decoding with our KV cache must reproduce ``transformers.generate`` token for token on
SmolLM2-135M-Instruct; top-p sampling and the MeCo metadata prefix; the `kiln import-hf / export-hf / generate`
commands end to end on a tiny model that carries a real tokenizer."""

from __future__ import annotations

import pytest
import torch

from kiln.cli import main
from kiln.pretrain.generate import generate, generate_text, metadata_prefix, sample_next
from kiln.pretrain.testing import smollm2_reference, smollm2_tokenizer

PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def smol():
    hf, model, cfg = smollm2_reference()
    return hf, model, cfg, smollm2_tokenizer()


def test_greedy_matches_transformers_generate_for_32_tokens(smol):
    hf, model, cfg, tok = smol
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    want = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=2)
    got = generate(model, ids, 32, greedy=True, eos_token_id=cfg.eos_token_id)
    assert got.shape[1] == ids.shape[1] + 32  # no early EOS on this prompt: all 32 tokens compared
    assert got.tolist() == want.tolist(), (tok.decode(got[0]), tok.decode(want[0]))


def test_top_p_sampling(smol):
    _, model, cfg, tok = smol
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    a = generate(model, ids, 4, greedy=False, top_p=0.9, seed=1)
    b = generate(model, ids, 4, greedy=False, top_p=0.9, seed=1)
    assert torch.equal(a, b)  # seeded
    tiny_p = generate(model, ids, 4, greedy=False, top_p=1e-6, seed=2)  # nucleus = the argmax token
    assert torch.equal(tiny_p, generate(model, ids, 4, greedy=True))


def test_sample_next_stays_inside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, greedy=False, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are cut
    draws = {int(sample_next(logits, greedy=False, top_p=1.0, generator=g)) for _ in range(400)}
    assert draws == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, greedy=False, top_p=0.0)


def test_metadata_prefix_is_prepended(smol, monkeypatch):
    _, model, _, tok = smol
    assert metadata_prefix("en.wikipedia.org") == "URL: en.wikipedia.org\n\n"
    assert metadata_prefix(None) == ""
    seen = []
    import kiln.pretrain.generate as gen

    real = gen.generate

    def spy(model, ids, *a, **k):
        seen.append(ids)
        return real(model, ids, *a, **k)

    monkeypatch.setattr(gen, "generate", spy)
    text = generate_text(model, tok, "Paris is", metadata="en.wikipedia.org", max_new_tokens=4)
    assert tok.decode(seen[0][0]) == "URL: en.wikipedia.org\n\nParis is"
    assert isinstance(text, str) and text


def test_chat_template_prompt(smol):
    _, model, _, tok = smol
    text = generate_text(model, tok, "What is the capital of France?", chat=True, max_new_tokens=12)
    assert "Paris" in text, text


# ---------------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, smol):
    """A random 2-layer Llama with SmolLM2's vocabulary, saved in HF format together with the real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smol[3]
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_hf")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_cli_import_export_generate(tiny_hf_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kiln_dir, hf_dir = tmp_path / "kiln", tmp_path / "hf"
    assert main(["import-hf", str(tiny_hf_dir), "--out", str(kiln_dir)]) == 0
    assert (kiln_dir / "model.yaml").is_file() and (kiln_dir / "tokenizer.json").is_file()
    assert main(["export-hf", str(kiln_dir), "--out", str(hf_dir)]) == 0
    original = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    exported = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.randint(0, 49152, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(x).logits, exported(x).logits)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok("URL: en.wikipedia.org\n\nHi").input_ids == smollm2_tokenizer()("URL: en.wikipedia.org\n\nHi").input_ids
    capsys.readouterr()

    args = ["generate", str(kiln_dir), "--prompt", "Hello", "--metadata", "en.wikipedia.org", "--max-new-tokens", "5"]
    assert main(args) == 0
    greedy_text = capsys.readouterr().out.strip()
    ids = tok("URL: en.wikipedia.org\n\nHello", return_tensors="pt").input_ids
    want = original.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert greedy_text == tok.decode(want[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert main(args + ["--top-p", "0.9", "--seed", "3"]) == 0


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--metadata" in out and "URL: HOST" in out and "--top-p" in out
    with pytest.raises(SystemExit):
        main(["generate", "smollm2", "--prompt", "x", "--greedy", "--top-p", "0.9"])  # mutually exclusive
    with pytest.raises(SystemExit):
        main(["generate", "smollm2", "--prompt", "x", "--top-p", "1.5"])
    assert main(["export-hf", "/nonexistent/model", "--out", "/nonexistent/out"]) == 2
    assert "not a model" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path):
    from kiln.pretrain.hf_io import load_model

    with pytest.raises(FileNotFoundError, match="not a model: expected a directory with model.yaml"):
        load_model(tmp_path)
