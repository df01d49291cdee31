"""Packed conversations do not see each other (issue 13): a packed sequence of the SFT builder holding two
conversations is run through the model the trainer trains; changing every token of the first conversation
leaves the logits of the second bitwise unchanged, while a model without document masking would change them
(the control shows the test can fail)."""

from __future__ import annotations

import numpy as np
import pytest
from test_sft_build import build

from kiln.data_pipeline.sft.dataset import SFTPackedDataset
from kiln.data_pipeline.sft.testing import tiny_tokenizer

torch = pytest.importorskip("torch")


def _logits(model, sample):
    with torch.no_grad():
        return model(
            sample["input_ids"][None],
            position_ids=sample["position_ids"][None],
            segment_ids=sample["segment_ids"][None],
        )[0]


def test_the_second_conversation_does_not_see_the_first(tmp_path):
    from kiln.pretrain.config import ModelConfig
    from kiln.pretrain.data import pack_sample
    from kiln.pretrain.model import KilnLlama

    tok = str(tiny_tokenizer(tmp_path / "tok"))
    build(tmp_path, tok)
    data = SFTPackedDataset(tmp_path / "out" / "train")
    index = next(i for i in range(len(data)) if len(data.conversations(i)) >= 2)
    tokens, mask, starts = data.read(index)
    first_len = int(data.conversations(index)[0])
    second = slice(first_len, first_len + int(data.conversations(index)[1]))

    altered = tokens.copy()
    rng = np.random.default_rng(0)
    altered[:first_len] = rng.integers(
        5, data.meta["tokenizer"]["vocab_size"], first_len
    )  # every token of conversation 1
    assert (altered[:first_len] != tokens[:first_len]).any()

    results = {}
    for masking in (True, False):
        cfg = ModelConfig(
            vocab_size=int(data.meta["tokenizer"]["vocab_size"]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            document_masking=masking,
        )  # fmt: skip
        model = KilnLlama(cfg, init_seed=0).eval()
        original = _logits(model, pack_sample(tokens, mask, starts))
        changed = _logits(model, pack_sample(altered, mask, starts))
        # input position t predicts token t+1: the second conversation's inputs are positions first_len ...
        results[masking] = (original[second.start : second.stop - 1], changed[second.start : second.stop - 1])
    kept, moved = results[True], results[False]
    assert kept[0].shape[0] > 0
    assert torch.equal(kept[0], kept[1])  # bitwise: the first conversation is invisible
    assert not torch.allclose(moved[0], moved[1])  # without document masking it leaks (the test can fail)
