"""Packed pretraining samples: determinism across DP sizes, blend proportions, masks, MeCo switch, errors."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from datatrove.data import Document

from kiln.data_pipeline.metadata import AddMetadata
from kiln.data_pipeline.tokenize import TokenizerTrainConfig, load_tokenizer, tokenize_documents, train_tokenizer
from kiln.pretrain.data import (
    DataConfig,
    DataError,
    DatasetSpec,
    MecoConfig,
    PretrainData,
    cooldown_step,
    pack_sample,
    phase_for_step,
    rank_sample_indices,
)

WORDS = "the kiln fires clay at high heat and glaze melts into glass while potters wait for a door to cool".split()


def texts(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    with open(root / "corpus.jsonl", "w") as f:
        for t in texts(200, seed=0):
            f.write(json.dumps({"text": t}) + "\n")
    tok_dir = train_tokenizer(
        TokenizerTrainConfig(inputs=[str(root / "corpus.jsonl")], output_dir=str(root / "tok"), vocab_size=320)
    )
    tok = load_tokenizer(tok_dir)
    a = tokenize_documents([Document(text=t, id=str(i)) for i, t in enumerate(texts(60, 1))], root / "a", tok)[0]
    b = tokenize_documents([Document(text=t, id=str(i)) for i, t in enumerate(texts(40, 2))], root / "b", tok)[0]
    docs = [
        Document(text=t, id=str(i), metadata={"url": f"https://site{i % 3}.example.org/p/{i}"} if i % 7 else {})
        for i, t in enumerate(texts(50, 3))
    ]
    tokenize_documents(list(AddMetadata().run(iter(docs))), root / "web", tok, meco=True)
    prefixes = [tok.encode(f"URL: site{j}.example.org\n\n") for j in range(3)]
    return {"root": root, "tok": tok, "tok_dir": tok_dir, "a": a, "b": b, "web": str(root / "web"), "meta": prefixes}


def test_samples_are_aligned_packed_and_masked(corpus):
    seq = 32
    data = PretrainData(DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=seq, seed=3))
    tok = corpus["tok"]
    n = 40
    samples = [data[i] for i in range(n)]
    stream = np.concatenate([s["input_ids"].numpy() for s in samples] + [samples[-1]["labels"][-1:].numpy()])
    # labels are the next tokens, and consecutive samples tile the stream (each token is a label once)
    for i, s in enumerate(samples):
        assert s["input_ids"].shape == (seq,) and s["labels"].shape == (seq,)
        assert torch.equal(s["labels"][:-1], s["input_ids"][1:])
        assert torch.equal(s["input_ids"], torch.from_numpy(stream[i * seq : (i + 1) * seq]))
    # the stream is epoch 0: every training document exactly once, whole, each starting with BOS
    bos = np.flatnonzero(stream == tok.bos_id)
    docs = np.split(stream, bos[1:])
    assert bos[0] == 0 and all(d[0] == tok.bos_id for d in docs)
    full = [d.tolist() for d in docs[:-1]]
    raw = [r.tolist() for r in (np.asarray(data.datasets[0].streams[None].tokens[j]) for j in range(60))]
    assert all(d in raw for d in full) and len({tuple(d) for d in full}) == len(full)
    for s in samples:
        lab, lm, inp = s["labels"], s["loss_mask"], s["input_ids"]
        # a label that is a BOS (next document) is never a target; every other label here is
        assert torch.equal(lm, (lab != tok.bos_id).float())
        # segment ids count documents, positions restart at each BOS and at the sample start
        starts = inp == tok.bos_id
        assert s["segment_ids"][0] == 0
        assert torch.equal(s["segment_ids"], torch.cumsum(starts.long(), 0) - int(starts[0]))
        expect_pos, p = [], -1
        for j in range(seq):
            p = 0 if (j == 0 or starts[j]) else p + 1
            expect_pos.append(p)
        assert s["position_ids"].tolist() == expect_pos


def test_same_samples_whatever_dp_size_and_access_order(corpus):
    cfg = DataConfig(datasets=[DatasetSpec(corpus["a"], 2.0), DatasetSpec(corpus["b"], 1.0)], seq_length=16, seed=7)
    one = PretrainData(cfg)
    two = PretrainData(cfg)
    gbs = 8
    for step in range(5):
        consumed = step * gbs
        full = one.rank_batch(consumed, gbs, 0, 1)
        halves = [two.rank_batch(consumed, gbs, r, 2) for r in range(2)]
        quarters = [PretrainData(cfg).rank_batch(consumed, gbs, r, 4) for r in (3, 1, 0, 2)]
        quarters = [quarters[2], quarters[1], quarters[3], quarters[0]]
        for key in full:
            assert torch.equal(full[key], torch.cat([h[key] for h in halves]))
            assert torch.equal(full[key], torch.cat([q[key] for q in quarters]))
    # far indices first (a "resume" at sample 300), then near ones: same content as sequential access
    fresh = PretrainData(cfg)
    far = fresh[300]["input_ids"]
    for i in range(301):
        one[i]
    assert torch.equal(far, one[300]["input_ids"])
    assert rank_sample_indices(16, 8, 1, 2).tolist() == [20, 21, 22, 23]
    with pytest.raises(DataError, match="not divisible"):
        rank_sample_indices(0, 6, 0, 4)
    # another seed is another order
    other = PretrainData(DataConfig(datasets=cfg.datasets, seq_length=16, seed=8))
    assert not torch.equal(other[0]["input_ids"], one[0]["input_ids"])


def test_blend_proportions_follow_weights(corpus):
    cfg = DataConfig(datasets=[DatasetSpec(corpus["a"], 3.0), DatasetSpec(corpus["b"], 1.0)], seq_length=8, seed=1)
    data = PretrainData(cfg)
    n = 4000
    counts = np.bincount([data.info(i).dataset for i in range(n)], minlength=2)
    assert abs(counts[0] / n - 0.75) < 0.005 and abs(counts[1] / n - 0.25) < 0.005
    # every prefix of the blend is within one sample of the weights (megatron's greedy rule)
    for m in (10, 101, 999):
        c = np.bincount([data.info(i).dataset for i in range(m)], minlength=2)
        assert abs(c[0] - 0.75 * m) <= 1.0
    # sample content comes from the named dataset, and dataset-samples are consecutive per dataset
    info = [data.info(i) for i in range(50)]
    assert [x.dataset_sample for x in info if x.dataset == 1] == list(range(sum(x.dataset == 1 for x in info)))
    single = PretrainData(DataConfig(datasets=[DatasetSpec(corpus["b"])], seq_length=8, seed=1))
    i = next(j for j, x in enumerate(info) if x.dataset == 1 and x.dataset_sample == 3)
    # dataset numbers feed the seed, so compare with the stream of the blended dataset itself
    assert torch.equal(data[i]["input_ids"], data.datasets[1].sample(3)[0]["input_ids"])
    assert single.info(5).prefix == corpus["b"]


def _strip_metadata(stream: np.ndarray, bos: int, prefixes: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Remove MeCo prefixes (right after a BOS) from a token stream; returns (kept tokens, metadata flags)."""
    is_meta = np.zeros(stream.size, dtype=bool)
    for j in np.flatnonzero(stream == bos):
        for p in prefixes:
            if stream[j + 1 : j + 1 + len(p)].tolist() == p:
                is_meta[j + 1 : j + 1 + len(p)] = True
                break
    return stream[~is_meta], is_meta


def test_meco_metadata_then_plain_with_no_loss_on_metadata(corpus):
    seq, gbs, total = 16, 4, 50
    cfg = DataConfig(
        datasets=[DatasetSpec(corpus["web"])], seq_length=seq, seed=5, meco=MecoConfig(True, cooldown_fraction=0.2)
    )
    data = PretrainData(cfg, total_steps=total, samples_at_step=gbs, model_vocab_size=512)
    assert cooldown_step(total, 0.2) == 40 and data.cooldown_start_sample == 160
    assert [phase_for_step(s, total, 0.2) for s in (0, 39, 40, 49)] == ["meco", "meco", "plain", "plain"]
    assert phase_for_step(89, 100) == "meco" and phase_for_step(90, 100) == "plain"
    g = data.cooldown_start_sample
    for i in (0, 77, g - 1):
        assert data.info(i).phase == "meco" and data.info(i).prefix == corpus["web"] + "_meco"
    for i in (g, g + 1, g + 30):
        assert data.info(i).phase == "plain" and data.info(i).prefix == corpus["web"] + "_plain"

    bos, prefixes = corpus["tok"].bos_id, corpus["meta"]
    meco = [data[i] for i in range(g)]
    meco_stream = np.concatenate([s["input_ids"].numpy() for s in meco] + [meco[-1]["labels"][-1:].numpy()])
    labels_mask = np.concatenate([[0.0]] + [s["loss_mask"].numpy() for s in meco])  # aligned with meco_stream
    text, is_meta = _strip_metadata(meco_stream, bos, prefixes)
    assert is_meta.sum() > 100  # the meco phase really has metadata (several epochs of it)
    assert labels_mask[is_meta].sum() == 0  # metadata tokens never carry loss
    assert labels_mask[meco_stream == bos].sum() == 0
    assert labels_mask[~is_meta & (meco_stream != bos)].min() == 1  # text tokens all do
    # no metadata at all after the switch
    plain = [data[i] for i in range(g, g + 40)]
    plain_stream = np.concatenate([s["input_ids"].numpy() for s in plain])
    assert _strip_metadata(plain_stream, bos, prefixes)[1].sum() == 0
    assert (np.concatenate([s["loss_mask"].numpy() for s in plain]) == 1).mean() > 0.9
    # the plain phase continues exactly where the meco phase stopped: meco text (sans the last, shared token)
    # followed by the plain samples is the plain twin's stream, no document skipped or repeated
    reference = data.datasets[0].streams["plain"].read(0, text.size - 1 + plain_stream.size)[0]
    assert np.array_equal(np.concatenate([text[:-1], plain_stream]), reference)


def test_meco_validation_split_uses_the_plain_twin(corpus):
    cfg = DataConfig(
        datasets=[DatasetSpec(corpus["web"])], seq_length=16, meco=MecoConfig(True), validation_fraction=0.2
    )
    data = PretrainData(cfg, total_steps=10, samples_at_step=4)
    streams = data.datasets[0].streams
    assert np.array_equal(streams["meco"].doc_ids, streams["plain"].doc_ids) and streams["meco"].doc_ids.size == 40
    prefix, val_stream, _ = data.validation.streams[0]
    assert prefix == corpus["web"] + "_plain" and not set(val_stream.doc_ids) & set(streams["plain"].doc_ids)
    val_tokens = np.concatenate([data.validation[i]["input_ids"].numpy() for i in range(len(data.validation))])
    assert _strip_metadata(val_tokens, corpus["tok"].bos_id, corpus["meta"])[1].sum() == 0


def test_meco_switch_follows_a_batch_ramp(corpus):
    cfg = DataConfig(datasets=[DatasetSpec(corpus["web"])], seq_length=16, meco=MecoConfig(True, 0.25))
    ramp = {0: 0, 1: 2, 2: 6}  # steps 0,1 use 2 and 4 samples, then 8 per step

    def samples_at(step):
        return ramp.get(step, 6 + 8 * (step - 2))

    data = PretrainData(cfg, total_steps=20, samples_at_step=samples_at)
    assert data.cooldown_start_sample == samples_at(15) == 110
    assert data.phase_for_sample(109) == "meco" and data.phase_for_sample(110) == "plain"
    with pytest.raises(DataError, match="total_steps"):
        PretrainData(cfg)


def test_validation_split_is_held_out(corpus):
    cfg = DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=16, seed=2, validation_fraction=0.2)
    data = PretrainData(cfg)
    val = data.validation
    train_docs = set(data.datasets[0].streams[None].doc_ids.tolist())
    held = val.streams[0][1].doc_ids.tolist()
    assert len(held) == 12 and not train_docs & set(held) and len(train_docs) == 48
    assert len(val) == (val.streams[0][1].epoch_tokens - 1) // 16 > 0
    batches = list(val.batches(2, max_batches=3))
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (2, 16)
    halves = [list(val.batches(1, max_batches=3, dp_rank=r, dp_size=2)) for r in range(2)]
    assert torch.equal(batches[1]["labels"], torch.cat([halves[0][1]["labels"], halves[1][1]["labels"]]))
    sep = PretrainData(
        DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=16, validation=[DatasetSpec(corpus["b"])])
    )
    assert sep.validation.streams[0][0] == corpus["b"] and len(sep.datasets[0].streams[None].doc_ids) == 60


def test_bad_data_is_a_clear_error(corpus, tmp_path):
    missing = str(tmp_path / "nope" / "web")
    with pytest.raises(DataError, match=f"data path {missing} does not exist"):
        PretrainData(DataConfig(datasets=[DatasetSpec(missing)], seq_length=8))
    with pytest.raises(DataError, match="vocab size 320.*vocab_size is 64"):
        PretrainData(DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=8), model_vocab_size=64)
    with pytest.raises(DataError, match="MeCo data"):
        PretrainData(DataConfig(datasets=[DatasetSpec(corpus["web"])], seq_length=8))
    with pytest.raises(DataError, match="does not exist"):
        PretrainData(
            DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=8, meco=MecoConfig(True)),
            total_steps=10,
            samples_at_step=2,
        )
    with pytest.raises(DataError, match="weight must be a positive"):
        PretrainData(DataConfig(datasets=[DatasetSpec(corpus["a"], 0.0)], seq_length=8))
    with pytest.raises(DataError, match="fewer than one sample"):
        PretrainData(DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=100_000))
    # a tokenizer that is not the dataset's: caught through the dataset's fingerprint
    other = train_tokenizer(
        TokenizerTrainConfig(
            inputs=[str(corpus["root"] / "corpus.jsonl")], output_dir=str(tmp_path / "t2"), vocab_size=340
        )
    )
    with pytest.raises(DataError, match="tokenizer mismatch"):
        PretrainData(DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=8, tokenizer=str(other)))
    PretrainData(DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=8, tokenizer=str(corpus["tok_dir"])))


def test_pack_sample_without_mask_dataset():
    tokens = np.array([1, 5, 6, 2, 1, 7, 8, 2, 1])
    mask = np.array([0, 1, 1, 1, 0, 1, 1, 1, 0], dtype=np.uint8)
    starts = tokens == 1
    s = pack_sample(tokens, mask, starts)
    assert s["loss_mask"].tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    assert s["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert s["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_packed_batch_loss_equals_per_document_loss(corpus):
    """The fields honour document boundaries in the model: per-token losses of a packed sample equal those of
    each document piece run on its own, and masked labels (next document's BOS) carry no loss."""
    from kiln.pretrain.config import ModelConfig
    from kiln.pretrain.model import KilnLlama

    cfg = ModelConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, fused_kernels=False, attention_backend="sdpa",
    )  # fmt: skip
    model = KilnLlama(cfg, init_seed=0)
    data = PretrainData(DataConfig(datasets=[DatasetSpec(corpus["a"])], seq_length=48), model_vocab_size=320)
    with_boundaries = [i for i in range(40) if data[i]["segment_ids"].max() >= 1][:3]
    assert len(with_boundaries) == 3
    batch = data.get_batch(with_boundaries)
    with torch.no_grad():
        packed = model(**batch, reduction="none")
        for b in range(3):
            seg = batch["segment_ids"][b]
            for s in seg.unique():
                idx = (seg == s).nonzero().flatten()
                alone = model(
                    batch["input_ids"][b : b + 1, idx],
                    labels=batch["labels"][b : b + 1, idx],
                    loss_mask=batch["loss_mask"][b : b + 1, idx],
                    reduction="none",
                )
                torch.testing.assert_close(packed[b, idx], alone[0], rtol=1e-5, atol=1e-5)
    assert (packed[batch["loss_mask"] == 0] == 0).all() and (packed[batch["loss_mask"] == 1] > 0).all()
    mean = float(model(**batch).detach())
    assert math.isfinite(mean) and mean == pytest.approx(float(packed.sum() / batch["loss_mask"].sum()), rel=1e-5)
