"""KilnLlama against Hugging Face LlamaForCausalLM on tiny random models: every RoPE variant, biases, untied
heads, the loss, document masking, KV cache, megatron layers at TP=1 and TP=2 (gloo), and the errors users get
for configs or checkpoints we cannot load."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.config import ConfigError, load_config, to_dict
from kiln.parallel import parallelize
from kiln.pretrain.config import ModelConfig, from_hf_config, to_hf_config
from kiln.pretrain.hf_io import export_hf, import_hf, import_hf_model
from kiln.pretrain.model import KilnLlama, positions_from_segments
from kiln.pretrain.testing import run_distributed, single_process_group

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}


def tiny_hf(rope=None, *, bias=False, tied=False, heads=4, kv_heads=2, seed=0):
    """A random 2-layer HF Llama (max_position_embeddings 32, so dynamic NTK kicks in past 32 tokens); every
    parameter is perturbed so that biases and norms are not trivially zero/one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = {"rope_type": "default", "rope_theta": 500.0} if rope is None else {"rope_theta": 500.0, **rope}
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
        rope_parameters=params,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ids(batch=2, seq=48, vocab=128, seed=1):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rope", list(ROPES))
def test_logits_match_transformers_for_every_rope_variant(rope):
    bias, tied = rope == "yarn", rope == "linear"  # also cover biases and a tied head
    hf = tiny_hf(ROPES[rope], bias=bias, tied=tied)
    model, cfg = import_hf_model(hf)
    assert cfg.rope_type == rope and cfg.attention_bias == bias and cfg.tie_word_embeddings == tied
    x = ids()  # 48 tokens > max_position_embeddings=32: dynamic NTK rescales
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-5, f"{rope}: max abs logit difference {diff}"


def test_loss_matches_transformers_with_ignored_and_masked_tokens():
    hf = tiny_hf()
    model, _ = import_hf_model(hf)
    x = ids(seq=20)
    labels = x.clone()
    labels[0, :5] = -100  # e.g. a prompt with no loss
    hf_loss = hf(x, labels=labels).loss  # HF shifts labels inside
    aligned = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    ours = model(x, labels=aligned)
    assert abs(ours.item() - hf_loss.item()) < 1e-5
    # loss_mask zeroes the same positions as -100
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[:, -1] = 0
    masked = model(x, labels=torch.cat([x[:, 1:], x[:, :1]], dim=1), loss_mask=mask)
    assert abs(masked.item() - hf_loss.item()) < 1e-5
    per_token = model(x, labels=aligned, reduction="none")
    assert per_token.shape == (2, 20) and per_token[0, :4].abs().max() == 0
    assert abs(per_token.sum().item() / (aligned != -100).sum().item() - hf_loss.item()) < 1e-5


def test_document_masking_packed_equals_separate_documents():
    hf = tiny_hf(bias=True)
    model, _ = import_hf_model(hf)
    docs = [ids(1, n, seed=10 + n) for n in (7, 12, 5)]
    packed = torch.cat(docs, dim=1)
    segments = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        out = model(packed, segment_ids=segments)
        start = 0
        for d in docs:
            alone = model(d)
            diff = (out[:, start : start + d.shape[1]] - alone).abs().max().item()
            assert diff < 1e-5, diff
            start += d.shape[1]
        # without masking the later documents see the earlier ones
        plain = model(packed)
        assert (plain[:, 7:19] - model(docs[1])).abs().max() > 1e-2


def test_positions_restart_per_document():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_kv_cache_decode_matches_full_forward():
    hf = tiny_hf(ROPES["llama3"], kv_heads=1)
    model, _ = import_hf_model(hf)
    x = ids(seq=16)
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(2, 20)
        steps = [model(x[:, :10], kv_cache=cache)]
        for t in range(10, 16):
            steps.append(model(x[:, t : t + 1], kv_cache=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    with pytest.raises(ValueError, match="one token at a time"):
        model(x[:, :2], kv_cache=cache)


def test_megatron_layers_at_tp1_equal_local_layers():
    cfg = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, attention_bias=True,
    )  # fmt: skip
    x, labels = ids(seq=12), ids(seq=12, seed=2)
    local = KilnLlama(cfg, init_seed=3)
    local_loss = local(x, labels=labels)
    local_loss.backward()
    with single_process_group() as group:
        mega = parallelize(KilnLlama(cfg, init_seed=3), group)  # a 1-rank TP group: megatron's layers
        assert type(mega.layers[0].self_attn.q_proj).__name__ == "ColumnParallelLinear"
        assert set(mega.state_dict()) == set(local.state_dict())
        with torch.no_grad():
            assert (mega(x) - local(x)).abs().max() < 1e-6
        mega_loss = mega(x, labels=labels)  # megatron vocab_parallel_cross_entropy
        mega_loss.backward()
    assert abs(mega_loss.item() - local_loss.item()) < 1e-6
    grads = dict(local.named_parameters())
    for name, p in mega.named_parameters():
        assert (p.grad - grads[name].grad).abs().max() < 1e-6, name


def _tp2_worker(rank, world_size, hf_dir, out_dir):
    from kiln.parallel import full_state_dict
    from kiln.parallel.tensor_parallel import default_tp_group
    from kiln.pretrain.hf_io import export_hf, import_hf

    cfg = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    x, labels = ids(seq=12), ids(seq=12, seed=2)
    # built on the meta device, split over megatron parallel_state's TP group, then initialised (its slices only)
    fresh = parallelize(KilnLlama(cfg, device="meta"), default_tp_group(), init_seed=3)
    loss = fresh(x, labels=labels)
    loss.backward()
    with torch.no_grad():
        fresh_logits = fresh(x)
    q_grad = fresh.layers[0].self_attn.q_proj.weight.grad.clone()
    o_grad = fresh.layers[1].self_attn.o_proj.weight.grad.clone()
    fresh.zero_grad()
    fresh(x).pow(2).mean().backward()  # through the vocabulary all-gather
    embed_grad = fresh.embed_tokens.weight.grad.clone()
    full = full_state_dict(fresh)  # gathered on every rank
    imported, _ = import_hf(hf_dir, rank, world_size)
    with torch.no_grad():
        imported_logits = imported(ids())
    export_hf(imported, _, out_dir)
    return {
        "fresh_logits": fresh_logits,
        "loss": loss.item(),
        "q_grad": q_grad,
        "o_grad": o_grad,
        "embed_grad": embed_grad,
        "full_embed": full["embed_tokens.weight"],
        "imported_logits": imported_logits,
    }


@pytest.mark.slow
def test_tp2_matches_single_process(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf(ROPES["yarn"], bias=True)
    hf.save_pretrained(tmp_path / "hf")
    results = run_distributed(_tp2_worker, 2, str(tmp_path / "hf"), str(tmp_path / "export"), tp=2)

    cfg = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    x, labels = ids(seq=12), ids(seq=12, seed=2)
    ref = KilnLlama(cfg, init_seed=3)
    loss = ref(x, labels=labels)
    loss.backward()
    with torch.no_grad():
        ref_logits = ref(x)
    q_grad = ref.layers[0].self_attn.q_proj.weight.grad.clone()
    o_grad = ref.layers[1].self_attn.o_proj.weight.grad.clone()
    ref.zero_grad()
    ref(x).pow(2).mean().backward()
    embed_grad = ref.embed_tokens.weight.grad
    for rank, r in enumerate(results):
        assert (r["fresh_logits"] - ref_logits).abs().max() < 1e-5  # same init at any TP size
        assert abs(r["loss"] - loss.item()) < 1e-5  # vocab-parallel cross-entropy
        assert (r["q_grad"] - q_grad.chunk(2, dim=0)[rank]).abs().max() < 1e-6  # column-parallel slice
        assert (r["o_grad"] - o_grad.chunk(2, dim=1)[rank]).abs().max() < 1e-6  # row-parallel slice
        assert (r["embed_grad"] - embed_grad.chunk(2, dim=0)[rank]).abs().max() < 1e-6  # tied vocab slice
        assert torch.equal(r["full_embed"], ref.embed_tokens.weight.detach())
        with torch.no_grad():
            assert (r["imported_logits"] - hf(ids()).logits).abs().max() < 1e-5
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (exported(ids()).logits - hf(ids()).logits).abs().max() < 1e-6


def test_training_steps_reduce_loss():
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8,
    )  # fmt: skip
    model = KilnLlama(cfg, init_seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = ids(4, 16, vocab=64)
    losses = []
    for _ in range(8):
        loss = model(x[:, :-1], labels=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


# ---------------------------------------------------------------------------------------------------------------
# configs


def test_hf_config_round_trip_keeps_every_field():
    for rope in ROPES.values():
        hf = tiny_hf(rope, bias=True, tied=True).config
        cfg = from_hf_config(hf)
        back = from_hf_config(to_hf_config(cfg))
        assert back == cfg
    cfg = from_hf_config(tiny_hf(ROPES["llama3"]).config)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500.0
    assert to_hf_config(cfg).rope_parameters["low_freq_factor"] == 1.0


def test_model_config_yaml_round_trip(tmp_path):
    import yaml

    cfg = from_hf_config(tiny_hf(ROPES["yarn"]).config, attention_backend="sdpa", document_masking=False)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(ModelConfig, path) == cfg


def test_legacy_config_json_with_rope_scaling_and_top_level_theta():
    legacy = {
        "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 5e5, "tie_word_embeddings": False, "hidden_act": "silu",
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }  # fmt: skip
    cfg = from_hf_config(legacy)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"factor": 4.0, "rope_type": "linear"}
    assert cfg.head_dim == 16


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "longrope"),
        ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "unknown rope_type 'su'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        (
            {"num_key_value_heads": 3},
            r"HF config: num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)",
        ),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method='awq'"),
    ],
)
def test_unsupported_hf_configs_are_refused_by_name(change, message):
    base = {
        "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 1e4, "hidden_act": "silu",
    }  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        from_hf_config({**base, **change})


def test_validate_tp_names_what_does_not_divide():
    cfg = ModelConfig()  # SmolLM2-135M: 9 heads, 3 KV heads
    cfg.validate_tp(3)
    with pytest.raises(ConfigError, match=r"does not divide num_attention_heads=9, num_key_value_heads=3.*\[1, 3\]"):
        cfg.validate_tp(2)
    # validate() hooks raise plain ValueError; the recipe loader turns it into a ConfigError naming the key
    with pytest.raises(ValueError, match="rope_type 'proportional' is not supported"):
        ModelConfig(rope_scaling={"rope_type": "proportional", "factor": 1.0}).validate()


def test_import_refuses_tp_before_reading_weights(tmp_path, monkeypatch):
    tiny_hf(heads=4, kv_heads=1).save_pretrained(tmp_path)

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the TP check")

    monkeypatch.setattr("kiln.pretrain.hf_io._safetensors_files", no_weights)
    with pytest.raises(ConfigError, match=r"tensor parallel size 2 does not divide num_key_value_heads=1"):
        import_hf(tmp_path, tp_rank=0, tp_size=2)


def test_import_refuses_unsupported_rope_before_reading_weights(tmp_path, monkeypatch):
    tiny_hf().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1], "long_factor": [1]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("kiln.pretrain.hf_io._safetensors_files", lambda *a: pytest.fail("weights read"))
    with pytest.raises(ConfigError, match="longrope"):
        import_hf(tmp_path)


def test_import_names_the_tensor_with_a_wrong_shape_before_loading(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    tiny_hf().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr("kiln.pretrain.hf_io.KilnLlama", lambda *a, **k: pytest.fail("model built before shape check"))
    with pytest.raises(ValueError, match=r"'layers.1.mlp.up_proj.weight' has shape \[95, 64\].*\[96, 64\]"):
        import_hf(tmp_path)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'norm.weight' is missing"):
        import_hf(tmp_path)


def test_export_import_round_trip_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf(ROPES["dynamic"], bias=True)
    model, cfg = import_hf_model(hf)
    export_hf(model, cfg, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    reloaded, cfg2 = import_hf(tmp_path)
    assert cfg2 == cfg
    with torch.no_grad():
        assert torch.equal(reloaded(ids()), model(ids()))


def test_sequence_parallel_needs_tp_and_cuda():
    with pytest.raises(ConfigError, match="sequence_parallel needs tensor parallel size > 1"):
        parallelize(KilnLlama(ModelConfig(num_hidden_layers=1, sequence_parallel=True), device="meta"), None)


def test_bfloat16_model_tracks_float32():
    hf = tiny_hf(ROPES["llama3"])
    model32, _ = import_hf_model(hf)
    model16, _ = import_hf_model(hf, dtype=torch.bfloat16)
    assert model16.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out16, out32 = model16(ids()), model32(ids())
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - out32).abs().max() < 0.05 * out32.abs().max()
    assert model16(ids(), labels=ids(seed=2)).dtype == torch.float32  # the loss is computed in fp32
