"""MeCo through the real trainer (issue 5 acceptance): metadata-conditioned datasets before the cooldown step,
their plain twins after, and the metadata (and BOS) tokens never contributing to the loss.

A small ``_meco`` / ``_plain`` pair is written with our tokenizer code (every document has a URL, so every
``_meco`` document starts ``[BOS] URL: <host>\\n\\n``). The tiny model is trained for 10 steps with
``meco.cooldown_fraction = 0.3`` (cooldown step 7) by ``kiln.pretrain.train.train`` on one gloo rank; the engine's
``train_batch`` is wrapped to record exactly the micro-batches it receives. The test then checks, sample by
sample, which twin they come from and that the loss mask is 0 on exactly the BOS and metadata positions.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from datatrove.data import Document

from kiln.data_pipeline.metadata import AddMetadata
from kiln.data_pipeline.tokenize import TokenizerTrainConfig, load_tokenizer, tokenize_documents, train_tokenizer
from kiln.pretrain.data import cooldown_step, phase_for_step
from kiln.pretrain.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "pretrain" / "tiny.yaml")
STEPS, COOLDOWN_FRACTION, SEQ, GLOBAL_BATCH, MICRO_BATCH = 10, 0.3, 128, 8, 2
HOSTS = [f"site{j}.example.org" for j in range(3)]
WORDS = "the kiln fires clay at high heat and glaze melts into glass while potters wait for a door to cool".split()


def texts(n: int, seed: int, lo: int, hi: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("meco")
    with open(root / "corpus.jsonl", "w") as f:
        for t in texts(200, 0, 3, 40):
            f.write(json.dumps({"text": t}) + "\n")
    tok_dir = train_tokenizer(
        TokenizerTrainConfig(inputs=[str(root / "corpus.jsonl")], output_dir=str(root / "tok"), vocab_size=320)
    )
    tok = load_tokenizer(tok_dir)
    # short documents (each, with its prefix, well under SEQ tokens): every sample holds a whole document start
    docs = [
        Document(text=t, id=str(i), metadata={"url": f"https://{HOSTS[i % 3]}/p/{i}"})
        for i, t in enumerate(texts(60, 3, 2, 8))
    ]
    tokenize_documents(list(AddMetadata().run(iter(docs))), root / "web", tok, meco=True)
    prefixes = [tok.encode(f"URL: {h}\n\n") for h in HOSTS]
    return {"prefix": str(root / "web"), "tok": tok, "prefixes": prefixes, "run_dir": str(root / "run")}


def _train_and_record(rank: int, world_size: int, prefix: str, run_dir: str) -> dict:
    """In the spawned rank: train with the real loop and record what the engine receives at every step."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from kiln.parallel.topology import destroy_parallel, init_parallel
    from kiln.pretrain.callbacks.base import Callback
    from kiln.pretrain.data import DataConfig, DatasetSpec, MecoConfig
    from kiln.pretrain.engine import TrainEngine
    from kiln.pretrain.recipe import load_recipe
    from kiln.pretrain.train import train

    recipe = load_recipe(
        TINY,
        [
            f"train_steps={STEPS}",
            "log_interval=1000",
            "model.vocab_size=384",
            f"parallel.micro_batch={MICRO_BATCH}",
            f"parallel.global_batch={GLOBAL_BATCH}",
            f"run_dir={run_dir}",
        ],
    )
    recipe.synthetic_data = None
    recipe.data = DataConfig(
        datasets=[DatasetSpec(prefix)], seq_length=SEQ, seed=7, meco=MecoConfig(True, COOLDOWN_FRACTION)
    )
    recipe.validate()
    ctx = init_parallel(recipe.layout(world_size), timeout_s=120)
    engine = TrainEngine(recipe, ctx)
    received: list[list[dict[str, torch.Tensor]]] = []
    inner = engine.train_batch

    def recording_step(micro_batches, global_batch, lr):
        received.append([{k: v.clone() for k, v in mb.items()} for mb in micro_batches])
        return inner(micro_batches, global_batch, lr)

    engine.train_batch = recording_step

    class Losses(Callback):
        def __init__(self):
            self.losses = []

        def on_step_end(self, state, metrics):
            self.losses.append(float(metrics["loss"]))

    losses = Losses()
    state = train(recipe, [losses], ctx=ctx, loggers=False, engine=engine)
    destroy_parallel()
    from kiln.pretrain.train import build_dataset

    data = build_dataset(recipe)  # the same config the loop built its data from: where each sample came from
    infos = [data.info(i) for i in range(STEPS * GLOBAL_BATCH)]
    return {
        "received": received,
        "losses": losses.losses,
        "steps": state.step,
        "infos": [(i.phase, i.prefix) for i in infos],
        "cooldown_start_sample": data.cooldown_start_sample,
    }


@pytest.fixture(scope="module")
def run(corpus):
    return run_distributed(_train_and_record, 1, corpus["prefix"], corpus["run_dir"], timeout=240)[0]


def _samples(step_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    """The micro-batches of one step split back into samples, in global-sample order."""
    out = []
    for mb in step_batches:
        for j in range(mb["input_ids"].shape[0]):
            out.append({k: v[j].numpy() for k, v in mb.items()})
    return out


def _metadata_positions(stream: np.ndarray, bos: int, prefixes: list[list[int]]) -> np.ndarray:
    """Flags over ``stream``: True on every token of a ``URL: host\\n\\n`` prefix that directly follows a BOS
    (a prefix cut by the end of ``stream`` counts as far as it goes)."""
    meta = np.zeros(stream.size, dtype=bool)
    for j in np.flatnonzero(stream == bos):
        for p in prefixes:
            after = stream[j + 1 : j + 1 + len(p)].tolist()
            if after and after == p[: len(after)]:
                meta[j + 1 : j + 1 + len(after)] = True
                break
    return meta


def test_meco_phase_switches_at_the_cooldown_step(run, corpus):
    cooldown = cooldown_step(STEPS, COOLDOWN_FRACTION)
    assert cooldown == 7 and run["steps"] == STEPS and len(run["received"]) == STEPS
    assert run["cooldown_start_sample"] == cooldown * GLOBAL_BATCH
    assert all(np.isfinite(run["losses"])) and run["losses"][-1] < run["losses"][0]
    bos, prefixes = corpus["tok"].bos_id, corpus["prefixes"]
    for step, batches in enumerate(run["received"]):
        assert len(batches) == GLOBAL_BATCH // MICRO_BATCH
        samples = _samples(batches)
        assert len(samples) == GLOBAL_BATCH
        phase = phase_for_step(step, STEPS, COOLDOWN_FRACTION)
        assert phase == ("meco" if step < 7 else "plain")
        for j, s in enumerate(samples):
            i = step * GLOBAL_BATCH + j
            assert run["infos"][i] == (phase, f"{corpus['prefix']}_{phase}")
            stream = np.concatenate([s["input_ids"], s["labels"][-1:]])
            n_meta = int(_metadata_positions(stream, bos, prefixes).sum())
            if phase == "meco":
                # every sample holds at least one whole document start, and every document carries its URL
                starts = [k for k in np.flatnonzero(stream == bos) if k + 1 + max(map(len, prefixes)) <= stream.size]
                assert starts, f"step {step} sample {j}: no whole document start"
                assert n_meta >= min(map(len, prefixes)) * len(starts), f"step {step} sample {j}: no URL prefix"
            else:
                assert n_meta == 0, f"step {step} sample {j}: metadata in the cooldown"
                assert (stream == bos).any()


def test_metadata_and_bos_never_carry_loss(run, corpus):
    """Over the whole meco phase the samples (overlapping by one token) form the ``_meco`` token stream: the
    prefixes are found there (also one cut by a sample boundary), and the loss mask must be 0 exactly on the
    labels that are BOS or metadata, 1 on every other label; in the plain phase 0 exactly on the BOS labels."""
    bos, prefixes = corpus["tok"].bos_id, corpus["prefixes"]
    for phase, steps in (("meco", range(0, 7)), ("plain", range(7, STEPS))):
        samples = [s for step in steps for s in _samples(run["received"][step])]
        for a, b in zip(samples, samples[1:]):
            assert a["labels"][-1] == b["input_ids"][0]  # consecutive samples overlap by one token
        stream = np.concatenate([s["input_ids"] for s in samples] + [samples[-1]["labels"][-1:]])
        label_mask = np.concatenate([s["loss_mask"] for s in samples])  # label_mask[q - 1] is stream token q's
        meta = _metadata_positions(stream, bos, prefixes)
        expected = ~(meta | (stream == bos))[1:]
        if phase == "meco":
            assert meta.sum() > 100
        else:
            assert meta.sum() == 0
            # the plain stream may start inside a document whose prefix belonged to the meco phase
        assert np.array_equal(label_mask.astype(bool), expected), f"{phase}: loss mask differs from the prefixes"


def test_masked_labels_do_not_change_the_loss(run):
    """What the engine computes from a received meco batch does not depend on the labels at mask-0 positions
    (the metadata and BOS labels): replacing them all leaves the loss and its gradients bitwise unchanged."""
    from kiln.pretrain.config import ModelConfig
    from kiln.pretrain.model import KilnLlama
    from kiln.pretrain.recipe import load_recipe

    cfg: ModelConfig = load_recipe(TINY, ["model.vocab_size=384"]).model
    model = KilnLlama(cfg, init_seed=0)
    mb = run["received"][0][0]
    masked = mb["loss_mask"] == 0
    assert masked.sum() >= 2 * 5  # at least the BOS and a prefix in each sample
    other = mb["labels"].clone()
    other[masked] = (other[masked] + 1 + torch.arange(int(masked.sum())) % 50) % cfg.vocab_size
    assert not torch.equal(other, mb["labels"])

    def loss_and_grad(labels):
        model.zero_grad()
        loss = model(
            mb["input_ids"],
            position_ids=mb["position_ids"],
            segment_ids=mb["segment_ids"],
            labels=labels,
            loss_mask=mb["loss_mask"],
        )
        loss.backward()
        return loss.detach(), model.embed_tokens.weight.grad.clone()

    (l1, g1), (l2, g2) = loss_and_grad(mb["labels"]), loss_and_grad(other)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    # and the labels that count do matter
    changed = mb["labels"].clone()
    changed[~masked] = (changed[~masked] + 1) % cfg.vocab_size
    assert not torch.equal(loss_and_grad(changed)[0], l1)
