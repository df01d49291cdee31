"""``kiln.parallel.parallelize`` on one process: the TP plan splits exactly the tensors it should, a model built
on the meta device and initialised after splitting equals the plain model, activation checkpointing keeps the
names and the numbers, and pipeline parameter names map back to the model's. Multi-rank equality is in
test_model (TP2), test_hf_io (TP3) and test_train_layouts (TP x PP x DP)."""

from __future__ import annotations

import torch

from kiln.parallel import parallelize
from kiln.parallel.pipeline import model_param_name
from kiln.parallel.tensor_parallel import tp_split_dim
from kiln.pretrain.config import ModelConfig
from kiln.pretrain.model import KilnLlama, full_shapes
from kiln.pretrain.testing import single_process_group

CFG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
)  # fmt: skip


def test_plan_split_dims():
    dims = {name: tp_split_dim(name) for name in full_shapes(ModelConfig(**CFG, tie_word_embeddings=False))}
    assert dims["embed_tokens.weight"] == 0 and dims["lm_head.weight"] == 0
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert dims[f"layers.1.{proj}.weight"] == 0 and dims[f"layers.1.{proj}.bias"] == 0
    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        assert dims[f"layers.0.{proj}.weight"] == 1 and dims[f"layers.0.{proj}.bias"] is None
    assert [n for n, d in dims.items() if d is None and not n.endswith("_proj.bias")] == [
        "layers.0.input_layernorm.weight",
        "layers.0.post_attention_layernorm.weight",
        "layers.1.input_layernorm.weight",
        "layers.1.post_attention_layernorm.weight",
        "norm.weight",
    ]


def test_meta_build_initialised_after_splitting_equals_the_plain_model():
    cfg = ModelConfig(**CFG, tie_word_embeddings=True)
    plain = KilnLlama(cfg, init_seed=5)
    meta = KilnLlama(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with single_process_group() as group:
        split = parallelize(meta, group, init_seed=5)  # megatron layers over a 1-rank group
        assert type(split.embed_tokens).__name__ == "VocabParallelEmbedding"
        assert not any(p.is_meta for p in split.parameters())
        got = dict(split.named_parameters())
        for name, p in plain.named_parameters():
            assert torch.equal(got[name], p), name
        with torch.no_grad():
            assert (split(x) - plain(x)).abs().max() < 1e-6


def test_activation_checkpointing_keeps_names_and_gradients():
    from kiln.parallel.layout import ParallelConfig

    cfg = ModelConfig(**CFG, tie_word_embeddings=False)
    ref = KilnLlama(cfg, init_seed=1)
    ckpt = parallelize(KilnLlama(cfg, device="meta"), None, ParallelConfig(activation_checkpointing=True), init_seed=1)
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    for model in (ref, ckpt):
        model(x[:, :-1], labels=x[:, 1:]).backward()
    grads = dict(ref.named_parameters())
    for name, p in ckpt.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-7), name


def test_pipeline_names_map_to_model_names():
    n = 2
    assert model_param_name("0.embed_tokens.weight", n) == "embed_tokens.weight"
    assert model_param_name("tied_modules.embed.embed_tokens.weight", n) == "embed_tokens.weight"
    assert model_param_name("1.layer.self_attn.q_proj.weight", n) == "layers.0.self_attn.q_proj.weight"
    assert model_param_name("2.layer.mlp.down_proj.bias", n) == "layers.1.mlp.down_proj.bias"
    assert model_param_name("3.norm.weight", n) == "norm.weight"
    assert model_param_name("4.lm_head.weight", n) == "lm_head.weight"
