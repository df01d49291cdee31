"""Tokenizer training/loading, tokenization into megatron-core indexed datasets, MeCo masks, checks, inspect."""

from __future__ import annotations

import argparse
import json
import pickle
import random
import warnings

import numpy as np
import pytest
from datatrove.data import Document

from kiln.config import ConfigError
from kiln.data_pipeline.cli import register as register_data
from kiln.data_pipeline.metadata import AddMetadata
from kiln.data_pipeline.tokenize import (
    EmptyCorpusError,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizeError,
    TokenizerMismatchError,
    TokenizerNotFoundError,
    TokenizerTrainConfig,
    TokenizeToIndexed,
    check_tokenizer_matches,
    inspect_tokenized,
    list_shards,
    load_tokenizer,
    merge_shards,
    read_meta,
    tokenize_documents,
    train_tokenizer,
)

from conftest import shared_file

WORDS = (
    "the kiln fires clay at high heat and the glaze melts into glass while potters wait for the door to cool "
    "naïve café 東京 😀 – “quoted” tab\tseparated  double  spaces"
).split(" ")


def synthetic_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(rng.randint(1, 4))]
        texts.append("\n".join(lines) + rng.choice(["", "\n", " ", "\n\n"]))
    return texts


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": t} for t in synthetic_texts(300, seed=0)])
    cfg = TokenizerTrainConfig(inputs=[str(corpus)], output_dir=str(root / "tok"), vocab_size=400, num_threads=1)
    return train_tokenizer(cfg)


def test_train_tokenizer_is_deterministic_with_specials(tok_dir, tmp_path):
    corpus = tok_dir.parent / "corpus.jsonl"
    again = train_tokenizer(
        TokenizerTrainConfig(inputs=[str(corpus)], output_dir=str(tmp_path / "again"), vocab_size=400, num_threads=1)
    )
    assert (again / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    specials = json.loads((tok_dir / "kiln_tokenizer.json").read_text())
    assert specials["bos"] == {"piece": "<s>", "id": 1}
    assert specials["eos"] == {"piece": "</s>", "id": 2}
    assert specials["pad"] == {"piece": "<pad>", "id": 3}
    assert specials["unk"] == {"piece": "<unk>", "id": 0}
    assert specials["chat_tokens"] == {"<|im_start|>": 4, "<|im_end|>": 5}
    assert specials["vocab_size"] == 400
    assert specials["trained_on"]["documents"] == 300
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (400, 1, 2, 3)
    assert specials["fingerprint"] == tok.fingerprint
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 4
    assert tok.encode("<|im_start|>user<|im_end|>")[-1] == 5
    assert 1 not in tok.encode("<s> in raw text stays text")  # control symbols never come from raw text


def test_lossless_round_trip_including_odd_characters(tok_dir):
    tok = load_tokenizer(tok_dir)
    texts = synthetic_texts(50, seed=1) + [
        "  leading and trailing spaces  ",
        "\u2581 the sentencepiece meta symbol \u2581\u2581 itself",
        "unseen: Ω ж ☃ 𝔘 \x00 \r\n",
        "",
    ]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text
    # a text cut anywhere encodes to the concatenation of its parts' ids (what loss masks rely on)
    text = texts[0]
    cut = len(text) // 2
    left, right = tok.encode_batch([text[:cut], text[cut:]])
    assert tok.decode(left + right) == text


def test_hf_export_gives_the_same_ids_and_fingerprint(tok_dir):
    sp, hf = load_tokenizer(tok_dir), load_tokenizer(tok_dir / "tokenizer.json")
    assert isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (400, 1, 2, 3)
    texts = synthetic_texts(100, seed=2) + ["<|im_start|>x<|im_end|>", "<s> raw"]
    assert sp.encode_batch(texts) == hf.encode_batch(texts)
    assert hf.fingerprint == sp.fingerprint
    assert [hf.decode(ids) for ids in hf.encode_batch(texts)] == texts


def test_hf_model_dirs_and_tokenizers_without_bos(tok_dir, tmp_path, megatron):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    from kiln.data_pipeline.tokenize.indexed import token_dtype

    model_dir = tmp_path / "hf_model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    hf = load_tokenizer(model_dir)
    assert isinstance(hf, HFTokenizer) and (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, 3)
    # an imported HF tokenizer writes the same dataset as the sentencepiece model it came from
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(synthetic_texts(8, seed=11))]
    tokenize_documents(docs, tmp_path / "sp", tok_dir)
    tokenize_documents(docs, tmp_path / "hf", model_dir)
    a, b = megatron.IndexedDataset(str(tmp_path / "sp")), megatron.IndexedDataset(str(tmp_path / "hf"))
    assert [a[i].tolist() for i in range(8)] == [b[i].tolist() for i in range(8)]
    check_tokenizer_matches(tmp_path / "hf", tok_dir)  # same vocabulary fingerprint

    # GPT-2 style: no BOS token, <|endoftext|> separates documents (BOS = EOS); big vocab -> int32 tokens
    gpt = HF(models.WordLevel({"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}, unk_token="[UNK]"))
    gpt.pre_tokenizer = pre_tokenizers.Whitespace()
    gpt.save(str(tmp_path / "gpt.json"))
    g = load_tokenizer(tmp_path / "gpt.json")
    assert (g.bos_id, g.eos_id, g.pad_id, g.vocab_size) == (0, 0, None, 4)
    assert g.encode("hello world") == [1, 2]
    assert token_dtype(65_000) == np.uint16 and token_dtype(128_256) == np.int32
    with pytest.raises(TokenizeError, match="cannot tell which token is EOS"):
        HF(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "bare.json"))
        load_tokenizer(tmp_path / "bare.json")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TokenizerNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty_dir")


def test_unigram_and_pickling(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in synthetic_texts(200, seed=3)])
    out = train_tokenizer(
        TokenizerTrainConfig(inputs=[str(corpus)], output_dir=str(tmp_path / "u"), vocab_size=330, model_type="unigram")
    )
    sp, hf = load_tokenizer(out), load_tokenizer(out / "tokenizer.json")
    texts = synthetic_texts(50, seed=4)
    assert sp.encode_batch(texts) == hf.encode_batch(texts)
    clone = pickle.loads(pickle.dumps(sp))
    assert clone.encode_batch(texts) == sp.encode_batch(texts)
    assert clone.fingerprint == sp.fingerprint


def _docs_for_meco():
    texts = synthetic_texts(12, seed=5)
    docs = []
    for i, text in enumerate(texts):
        meta = {"url": f"https://site{i % 3}.example.org/page/{i}"} if i != 4 else {}
        docs.append(Document(text=text, id=str(i), metadata=meta))
    docs[7].text = "has the meta symbol \u2581 in it\n"
    docs.insert(5, Document(text="", id="empty", metadata={"url": "https://e.org"}))
    # a prompt/response style document: "Question: 2+2?" (14 characters) carries no loss
    docs.append(Document(text="Question: 2+2? Answer: 4", id="sft", metadata={"no_loss_ranges": [(0, 14)]}))
    return list(AddMetadata().run(iter(docs)))


def test_meco_datasets_masks_and_round_trip(tok_dir, tmp_path, megatron):
    tok = load_tokenizer(tok_dir)
    docs = _docs_for_meco()
    written = tokenize_documents(docs, tmp_path / "web", tok_dir, meco=True, batch_size=5)
    assert written == [str(tmp_path / "web_meco"), str(tmp_path / "web_plain")]
    kept = [d for d in docs if d.text]
    assert len(kept) == 13
    meco = megatron.IndexedDataset(str(tmp_path / "web_meco"))
    meco_mask = megatron.IndexedDataset(str(tmp_path / "web_meco_loss_mask"))
    plain = megatron.IndexedDataset(str(tmp_path / "web_plain"))
    plain_mask = megatron.IndexedDataset(str(tmp_path / "web_plain_loss_mask"))
    assert len(meco) == len(plain) == len(meco_mask) == len(plain_mask) == 13
    assert list(meco.document_indices) == list(range(14))  # one document = one sequence
    assert meco.index.dtype == np.uint16 and meco_mask.index.dtype == np.uint8
    expected_tokens = {"meco": 0, "plain": 0}
    for i, doc in enumerate(kept):
        prefix = doc.metadata.get("meco_prefix", "")
        prefix_ids = tok.encode(prefix) if prefix else []
        text_ids = tok.encode(doc.text) if doc.id != "sft" else tok.encode("Question: 2+2?") + tok.encode(" Answer: 4")
        p = len(prefix_ids)
        assert meco[i].tolist() == [1, *prefix_ids, *text_ids, 2]
        assert plain[i].tolist() == [1, *text_ids, 2]
        assert tok.decode(meco[i][1 + p : -1]) == doc.text
        assert tok.decode(meco[i][1 : 1 + p]) == prefix
        assert tok.decode(plain[i]) == doc.text
        zeros = 1 + p if doc.id != "sft" else 1 + len(tok.encode("Question: 2+2?"))
        assert np.flatnonzero(meco_mask[i] == 0).tolist() == list(range(zeros))
        assert np.flatnonzero(plain_mask[i] == 0).tolist() == list(range(zeros - p))
        assert meco_mask[i].size == meco[i].size and plain_mask[i].size == plain[i].size
        expected_tokens["meco"] += meco[i].size
        expected_tokens["plain"] += plain[i].size
    meta = read_meta(tmp_path / "web_meco")
    assert (meta["documents"], meta["tokens"], meta["documents_without_metadata"]) == (13, expected_tokens["meco"], 2)
    assert meta["variant"] == "meco" and meta["token_dtype"] == "uint16" and meta["loss_mask"] == "web_meco_loss_mask"
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["tokenizer"]["vocab_size"] == 400
    assert meta["loss_tokens"] == int(sum(meco_mask[i].sum() for i in range(13)))
    plain_meta = read_meta(tmp_path / "web_plain")
    assert (plain_meta["documents"], plain_meta["tokens"]) == (13, expected_tokens["plain"])
    assert plain_meta["loss_tokens"] - meta["loss_tokens"] == 0  # the prefix only ever adds no-loss tokens


def test_parallel_shards_with_the_local_executor(tok_dir, tmp_path, megatron):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader

    texts = synthetic_texts(30, seed=6)
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"text": t, "id": str(i)} for i, t in enumerate(texts[:10])])
    write_jsonl(src / "b.jsonl", [{"text": t, "id": str(i)} for i, t in enumerate(texts[10:])])
    write_jsonl(src / "c.jsonl", [])  # the third task gets an empty shard
    out = tmp_path / "tok" / "web"
    LocalPipelineExecutor(
        [JsonlReader(str(src)), TokenizeToIndexed(out, tok_dir, batch_size=4)],
        tasks=3,
        workers=1,
        logging_dir=str(tmp_path / "logs"),
    ).run()
    assert list_shards(out) == [f"{out}_00000", f"{out}_00001"]
    assert [read_meta(f"{out}_{r:05d}")["documents"] for r in range(3)] == [10, 20, 0]
    assert merge_shards(out) == [str(out)]
    assert not (tmp_path / "tok" / "web_00000.bin").exists()  # shards removed after the merge
    ds = megatron.IndexedDataset(str(out))
    tok = load_tokenizer(tok_dir)
    assert [tok.decode(ds[i]) for i in range(len(ds))] == texts
    assert read_meta(out)["merged_from_shards"] == 3


def test_tokenizer_checks(tok_dir, tmp_path):
    tokenize_documents([Document(text="hello kiln", id="0")], tmp_path / "d", tok_dir)
    meta = check_tokenizer_matches(tmp_path / "d", tok_dir)
    assert meta["documents"] == 1
    assert check_tokenizer_matches(tmp_path / "d", tok_dir / "tokenizer.json")["tokens"] == meta["tokens"]
    with pytest.raises(TokenizerNotFoundError, match="tokenizer not found: .*nowhere"):
        check_tokenizer_matches(tmp_path / "d", tmp_path / "nowhere")
    corpus = write_jsonl(tmp_path / "other.jsonl", [{"text": t} for t in synthetic_texts(300, seed=9)])
    bigger = train_tokenizer(TokenizerTrainConfig(inputs=[str(corpus)], output_dir=str(tmp_path / "b"), vocab_size=450))
    with pytest.raises(TokenizerMismatchError, match="vocab size 400.*has vocab size 450"):
        check_tokenizer_matches(tmp_path / "d", bigger)
    other = train_tokenizer(
        TokenizerTrainConfig(inputs=[str(corpus)], output_dir=str(tmp_path / "o"), vocab_size=400, chat_tokens=["<x>"])
    )
    with pytest.raises(TokenizerMismatchError, match="same vocab size \\(400\\) but a different vocabulary"):
        check_tokenizer_matches(tmp_path / "d", other)
    with pytest.raises(TokenizeError, match="is not a tokenized dataset"):
        check_tokenizer_matches(tmp_path / "missing", tok_dir)
    assert issubclass(TokenizerMismatchError, ConfigError)  # `kiln` prints it as a clean error, exit code 2


def test_empty_corpus_errors(tok_dir, tmp_path):
    with pytest.raises(EmptyCorpusError, match="corpus is empty"):
        tokenize_documents([], tmp_path / "e", tok_dir)
    with pytest.raises(EmptyCorpusError, match="corpus is empty"):
        tokenize_documents([Document(text="", id="0")], tmp_path / "e2", tok_dir, meco=True)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"content": "wrong key"}])
    with pytest.raises(EmptyCorpusError, match="no text in 1 input file"):
        train_tokenizer(TokenizerTrainConfig(inputs=[str(empty)], output_dir=str(tmp_path / "t")))
    with pytest.raises(TokenizeError, match="input not found"):
        train_tokenizer(TokenizerTrainConfig(inputs=[str(tmp_path / "nope.jsonl")], output_dir=str(tmp_path / "t")))


def test_inspect_marks_no_loss_tokens(tok_dir, tmp_path):
    docs = list(AddMetadata().run(iter([Document(text="fire the kiln", id="0", metadata={"url": "http://a.org/x"})])))
    tokenize_documents(docs, tmp_path / "i", tok_dir, meco=True)
    report = inspect_tokenized(tmp_path / "i_meco", tok_dir, n=5)
    assert "⟦<s>URL: a.org\n\n⟧fire the kiln</s>" in report
    assert "--- document 0:" in report and "1 documents" in report and "legend: no loss: ⟦...⟧" in report
    assert "⟦<s>⟧fire the kiln</s>" in inspect_tokenized(tmp_path / "i_plain")  # tokenizer from meta.json
    assert "\x1b[2m<s>URL: a.org\n\n\x1b[0mfire" in inspect_tokenized(tmp_path / "i_meco", tok_dir, color=True)
    with pytest.raises(TokenizeError, match="document 3 out of range"):
        inspect_tokenized(tmp_path / "i_meco", tok_dir, start=3)


def test_cli_train_tokenize_inspect(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="kiln")
    register_data(parser.add_subparsers())
    data_commands = parser._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0].choices
    assert "inspect-tokens" not in data_commands  # folded into `kiln data inspect`
    corpus = write_jsonl(
        tmp_path / "c.jsonl",
        [{"text": t, "url": f"https://www.s{i % 2}.com/x"} for i, t in enumerate(synthetic_texts(40, seed=7))],
    )

    def run(*argv: str) -> int:
        args = parser.parse_args(["data", *argv])
        return args.func(args)

    assert run("train-tokenizer", str(corpus), "-o", str(tmp_path / "tok"), "--vocab-size", "350") == 0
    out = tmp_path / "out" / "c"
    assert run("tokenize", str(corpus), "-t", str(tmp_path / "tok"), "-o", str(out), "--meco", "--strip-www") == 0
    printed = capsys.readouterr()
    assert f"{out}_meco: 40 documents" in printed.out and f"{out}_plain: 40 documents" in printed.out
    assert "  stage tokenize " in printed.err and "  stage tokenize_merge " in printed.err  # the runner's stages
    assert (tmp_path / "out" / "c.work" / "logs" / "tokenize.log").is_file()
    assert run("inspect", f"{out}_meco", "-n", "1", "--no-color") == 0
    assert "⟦<s>URL: s0.com\n\n⟧" in capsys.readouterr().out
    assert run("inspect", f"{out}_meco", "-t", str(tmp_path / "tok"), "-n", "1", "--start", "1", "--color") == 0
    shown = capsys.readouterr().out
    assert "--- document 1:" in shown and "\x1b[2m<s>URL: s1.com\n\n\x1b[0m" in shown
    with pytest.raises(TokenizerNotFoundError, match="tokenizer not found"):
        run("tokenize", str(corpus), "-t", str(tmp_path / "none"), "-o", str(out))
    with pytest.raises(TokenizeError, match="--tasks must be >= 1, got 0"):
        run("tokenize", str(corpus), "-t", str(tmp_path / "tok"), "-o", str(out), "--tasks", "0")
    help_text = " ".join(data_commands["tokenize"].format_help().split())
    assert "megatron-core indexed datasets" in help_text
    assert "min(--tasks, CPU count)" in help_text  # executor.workers' meaning


@pytest.mark.shared_data
def test_real_web_text_round_trip_every_document(tmp_path, megatron):
    path = shared_file("web/wceb_modern_1000_url_text.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    sample = write_jsonl(tmp_path / "sample.jsonl", rows[:150])
    tok_dir = train_tokenizer(
        TokenizerTrainConfig(inputs=[str(sample)], output_dir=str(tmp_path / "tok"), vocab_size=2000, num_threads=2)
    )
    tok = load_tokenizer(tok_dir)
    docs = [Document(text=r["text"], id=r["id"], metadata={"url": r["url"]}) for r in rows]
    docs = list(AddMetadata().run(iter(docs)))
    tokenize_documents(docs, tmp_path / "wceb", tok, meco=True)
    meco = megatron.IndexedDataset(str(tmp_path / "wceb_meco"))
    mask = megatron.IndexedDataset(str(tmp_path / "wceb_meco_loss_mask"))
    plain = megatron.IndexedDataset(str(tmp_path / "wceb_plain"))
    assert len(meco) == len(plain) == 1000
    # two records have no usable URL ("" and "/bigquery"): written without a prefix, counted
    assert [d.id for d in docs if "meco_prefix" not in d.metadata] == ["wceb-0551", "wceb-0701"]
    prefixes = tok.encode_batch([d.metadata.get("meco_prefix", "") for d in docs])
    for i, doc in enumerate(docs):
        p = len(prefixes[i])
        tokens = meco[i]
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        assert tokens[1 : 1 + p].tolist() == prefixes[i]
        assert tok.decode(tokens[1 + p : -1]) == doc.text
        assert np.flatnonzero(mask[i] == 0).tolist() == list(range(1 + p))
        assert tok.decode(plain[i]) == doc.text
    meta = read_meta(tmp_path / "wceb_meco")
    assert meta["documents"] == 1000 and meta["documents_without_metadata"] == 2
    assert meta["tokens"] == int(meco.sequence_lengths.sum())
    assert read_meta(tmp_path / "wceb_plain")["tokens"] == meta["tokens"] - sum(map(len, prefixes))
