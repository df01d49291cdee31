"""The Kiln decoder: a Llama-architecture transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP) on one
device, numerically the same as Hugging Face ``LlamaForCausalLM``.

Read top to bottom:

1. weights: the full shape of every parameter and the one random init (``initial_weights``), shared by every
   layout (``kiln.parallel`` slices the same full tensors for each rank);
2. plain layers: ``Linear``, ``Embedding``, ``RMSNorm`` and the loss ``LMLoss``;
3. RoPE (all the Llama variants HF implements: default, linear, dynamic NTK, YaRN, Llama 3);
4. the blocks: Attention, MLP, DecoderLayer;
5. ``KilnLlama``: embedding -> layers -> final norm -> LM head, returning logits or the loss;
6. ``KVCache`` for generation.

Layout: activations between layers are ``[seq, batch, hidden]`` (Megatron's convention, which its sequence
parallel collectives and the DeepSpeed pipeline stages assume); attention kernels take ``[batch, seq, heads,
head_dim]``. Parameter names are Hugging Face's without the leading ``model.`` (``layers.3.self_attn.q_proj.
weight``), so import/export is a rename, not a remap. q/k/v and gate/up stay separate projections (not one
fused qkv / gate-up matmul) for the same reason, and so that a contiguous row slice is always whole heads.

This file knows nothing about process groups. Parallelism is applied from outside by
``kiln.parallel.parallelize`` (torchtitan's shape): its tensor-parallel plan swaps the projections, the
embedding and the head for megatron-core layers holding this rank's slice, divides the attention's head counts,
and swaps the two modules whose math changes when the vocabulary is split: ``lm_loss`` (a vocab-parallel
cross-entropy) and ``gather_logits`` (an all-gather of the vocabulary slices; the identity here). Pipeline
stages are cut out of these same modules. Build on ``device="meta"`` to parallelise a model too big for one
device; ``parallelize`` then materialises and initialises only this rank's parameters with ``initial_weights``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln import kernels
from kiln.config import ConfigError
from kiln.pretrain.config import ModelConfig

# ---------------------------------------------------------------------------------------------------------------
# 1. Weights

INIT_STD = 0.02  # Normal(0, INIT_STD) projections and embeddings (GPT-2 / Megatron)
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")  # write into the residual stream: std / sqrt(2 * layers)


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every parameter, in a fixed order: what a checkpoint for ``cfg`` must hold."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[f"{p}self_attn.{proj}.weight"] = (out, h)
            if cfg.attention_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if cfg.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for proj in ("gate_proj", "up_proj"):
            shapes[f"{p}mlp.{proj}.weight"] = (cfg.intermediate_size, h)
            if cfg.mlp_bias:
                shapes[f"{p}mlp.{proj}.bias"] = (cfg.intermediate_size,)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
        if cfg.mlp_bias:
            shapes[p + "mlp.down_proj.bias"] = (h,)
    shapes["norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_full_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> None:
    """Raise ValueError naming the first tensor whose shape differs from ``cfg``, or that is missing/unexpected."""
    expected = full_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"{source}: tensor {name!r} is missing (expected shape {list(shape)})")
        if tuple(shapes[name]) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {list(shapes[name])} but the config expects {list(shape)}"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) for this config: {extra[:5]}")


def initial_weights(cfg: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """The random init, as full-size tensors in ``full_shapes`` order, one at a time: Normal(0, 0.02)
    projections and embeddings, 0.02 / sqrt(2 * layers) for the projections into the residual stream (o_proj,
    down_proj; GPT-2 / Megatron), ones for norms, zeros for biases.

    The only place the init is written. Every layout draws every tensor from the same generator in this order
    (also those it does not hold, to keep the stream aligned) and keeps its part, so a run at any TP x PP
    layout starts from the weights of a 1-rank run. Peak extra memory: one full tensor (the embedding)."""
    gen = torch.Generator().manual_seed(seed)
    out_std = INIT_STD / math.sqrt(2 * cfg.num_hidden_layers)
    for name, shape in full_shapes(cfg).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape)
        else:
            std = out_std if name.split(".")[-2] in RESIDUAL_OUTPUTS else INIT_STD
            yield name, torch.randn(shape, generator=gen) * std


# ---------------------------------------------------------------------------------------------------------------
# 2. Plain layers. Allocated with torch.empty (no init cost; nothing at all on the meta device): the weights come
# from ``initial_weights`` or a checkpoint. Each is a swap point of kiln.parallel's tensor-parallel plan.


class Linear(nn.Module):
    """y = x W^T + b. ``own_weight=False`` with ``forward(x, weight=...)`` serves a tied LM head, which reads the
    embedding's weight instead of holding a copy (megatron's ColumnParallelLinear takes the same call)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, own_weight: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features)) if own_weight else None
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight if weight is None else weight, self.bias)


class Embedding(nn.Module):
    """Token ids [batch, seq] -> [seq, batch, hidden]: the transpose to the between-layers layout happens here,
    because under sequence parallelism the TP embedding does it itself (before scattering the sequence)."""

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = vocab_size, hidden
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).transpose(0, 1).contiguous()


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with ``residual``: (norm(x + residual), x + residual) in one fused kernel."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual, backend=self.backend)


class LMLoss(nn.Module):
    """Cross-entropy of [seq, batch, vocab] logits against [batch, seq] labels (already aligned: labels[:, t]
    is the target after token t); -100 and ``loss_mask == 0`` positions get no loss.

    ``per_token`` is the part tensor parallelism replaces (a vocab-parallel cross-entropy over vocabulary
    slices, which never gathers the logits); the masking and the reduction stay here, written once."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def per_token(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[seq, batch, vocab] logits, [seq, batch] labels -> [seq, batch] losses (any value where label -100)."""
        return kernels.cross_entropy(logits, labels, reduction="none", backend=self.backend)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask=None, reduction: str = "mean"):
        """reduction: "mean" over counted tokens, "sum", or "none" ([batch, seq], zero where not counted)."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean | sum | none, got {reduction!r}")
        labels = labels.transpose(0, 1).contiguous()
        weight = (labels != -100).float()
        if loss_mask is not None:
            weight = weight * loss_mask.transpose(0, 1).float()
        per_token = self.per_token(logits, labels).view_as(weight) * weight
        if reduction == "none":
            return per_token.transpose(0, 1)
        total = per_token.sum()
        return total if reduction == "sum" else total / weight.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# 3. Rotary position embeddings


def rope_inv_freq(cfg: ModelConfig, seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale for ``cfg``'s RoPE variant, computed with the same
    expressions as transformers' ``ROPE_INIT_FUNCTIONS`` so the results match bit for bit.

    ``seq_len`` is only used by dynamic NTK scaling, which stretches the base once a sequence exceeds
    ``max_position_embeddings``.
    """
    base, dim = cfg.rope_theta, cfg.head_dim
    params = cfg.rope_scaling or {}
    kind = cfg.rope_type
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "dynamic":
        factor, max_pos = params["factor"], cfg.max_position_embeddings
        if seq_len is None:
            return inv_freq, 1.0
        seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype))
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)), 1.0
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, params)
    raise ConfigError(f"rope_type {kind!r} is not supported")


def _yarn_inv_freq(cfg: ModelConfig, params: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, ramp in between; scale cos/sin."""
    base, dim = cfg.rope_theta, cfg.head_dim
    original = params.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = params.get("factor") or cfg.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the original (extrapolated) frequency is kept
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies. Computed on the CPU
        # even inside a `with torch.device("meta")` build: they are data, not parameters.
        with torch.device("cpu"):
            self.inv_freq, self.scale = rope_inv_freq(cfg)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [batch, seq] -> cos, sin [batch, seq, head_dim] (fp32 math, cast to ``dtype``)."""
        inv_freq = self.inv_freq.to(position_ids.device)
        if self.cfg.rope_type == "dynamic":
            # Stateless version of HF's dynamic NTK: the base grows with the longest position in this call.
            seq_len = position_ids.max().detach().cpu() + 1
            if int(seq_len) > self.cfg.max_position_embeddings:
                inv_freq = rope_inv_freq(self.cfg, seq_len)[0].to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] document ids -> position ids restarting at 0 at every document start."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


# ---------------------------------------------------------------------------------------------------------------
# 4. Blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        # heads this module computes: all of them here; tensor parallelism divides both (whole heads per rank)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.backend = cfg.attention_backend
        self.rope_backend = cfg.kernel_backend
        q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_out, cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_out, cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_out, cfg.attention_bias)
        self.o_proj = Linear(q_out, cfg.hidden_size, cfg.attention_bias)

    def forward(self, x, cos, sin, segment_ids=None, kv_cache: KVCache | None = None):
        # x: [seq, batch, hidden] ([seq/tp, ...] under sequence parallelism: the q/k/v projections gather it)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        s, b = q.shape[0], q.shape[1]
        q = q.view(s, b, self.n_heads, self.head_dim).transpose(0, 1)  # [batch, seq, heads, head_dim]
        k = k.view(s, b, self.n_kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(s, b, self.n_kv_heads, self.head_dim).transpose(0, 1)
        q, k = kernels.apply_rope(q, k, cos, sin, backend=self.rope_backend)
        causal = True
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
            if past > 0:
                if s != 1:
                    raise ValueError(f"with a non-empty KV cache, feed one token at a time (got a chunk of {s})")
                causal = False  # the single new token attends to every cached position
        out = kernels.attention(q, k, v, causal=causal, segment_ids=segment_ids, backend=self.backend)
        out = out.transpose(0, 1).reshape(s, b, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backend = cfg.kernel_backend
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.kernel_backend)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.kernel_backend)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, segment_ids=None, kv_cache=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, kv_cache)
        normed, h = self.post_attention_layernorm(attn, residual=x)  # h = x + attn
        return h + self.mlp(normed)


# ---------------------------------------------------------------------------------------------------------------
# 5. The model


class KilnLlama(nn.Module):
    """Llama decoder on one device.

    ``init_seed``: fill the weights with ``initial_weights(cfg, init_seed)``; None leaves them uninitialised for
    a checkpoint to fill (``kiln.pretrain.hf_io``). ``device="meta"``: allocate nothing (shapes only) and skip
    the init, for ``kiln.parallel.parallelize`` to split first and then materialise only this rank's part.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        init_seed: int | None = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        backend = cfg.kernel_backend
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
            # A tied head reads embed_tokens.weight (under TP both split the vocabulary the same way).
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, own_weight=not cfg.tie_word_embeddings)
            self.rotary = RotaryEmbedding(cfg)
            self.lm_loss = LMLoss(backend)
            # The logits hold the whole vocabulary here; under TP this becomes an all-gather of the slices.
            self.gather_logits = nn.Identity()
        self.to(dtype)
        if init_seed is not None and not self.embed_tokens.weight.is_meta:
            self.init_weights(init_seed)

    # --- weights ---

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """``initial_weights(cfg, seed)`` into this (full-size) model."""
        params = dict(self.named_parameters())
        for name, full in initial_weights(self.cfg, seed):
            params[name].copy_(full)

    @torch.no_grad()
    def load_full_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full-size tensors (our names) into this model; shapes are checked first. A model split by
        tensor parallelism loads through ``kiln.parallel.load_full_state_dict``, which slices."""
        check_full_shapes(self.cfg, {k: tuple(v.shape) for k, v in tensors.items()})
        params = dict(self.named_parameters())
        for name, full in tensors.items():
            params[name].copy_(full)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the parameters (our names). Refuses a model whose parameters are slices (split by tensor
        parallelism: ``kiln.parallel.full_state_dict`` gathers those) rather than return them as if whole."""
        out = {name: p.detach().clone() for name, p in self.named_parameters()}
        try:
            check_full_shapes(self.cfg, {k: tuple(v.shape) for k, v in out.items()}, source="this model")
        except ValueError as e:
            raise ValueError(f"{e}: it holds slices; kiln.parallel.full_state_dict(model) gathers them") from None
        return out

    # --- forward ---

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [seq, batch, hidden] -> logits [seq, batch, vocab] (a slice under TP)."""
        weight = self.embed_tokens.weight if self.cfg.tie_word_embeddings else None
        return self.lm_head(self.norm(h), weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """input_ids [batch, seq] -> logits [batch, seq, vocab] (the full vocabulary), or the loss.

        labels [batch, seq] are already aligned with the inputs (labels[:, t] is the target after token t);
        -100 and loss_mask == 0 positions get no loss. reduction: "mean" over counted tokens, "sum", or "none"
        ([batch, seq] per-token losses, zero where not counted).
        segment_ids [batch, seq]: packed documents (used when cfg.document_masking): positions restart per
        document and attention stays inside it.
        """
        b, s = input_ids.shape
        if not self.cfg.document_masking:
            segment_ids = None
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            else:
                start = kv_cache.length if kv_cache is not None else 0
                position_ids = torch.arange(start, start + s, device=input_ids.device).expand(b, s)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, segment_ids, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(s)
        logits = self.head(h)
        if labels is None:
            return self.gather_logits(logits).transpose(0, 1)
        return self.lm_loss(logits, labels, loss_mask, reduction)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for the key/value heads this model computes (this rank's, under TP)."""
        p = next(self.parameters())
        shape = (self.cfg.num_hidden_layers, batch, max_len, self.layers[0].self_attn.n_kv_heads)
        return KVCache(shape + (self.cfg.head_dim,), p.dtype, p.device)


# ---------------------------------------------------------------------------------------------------------------
# 6. KV cache


class KVCache:
    """Preallocated keys/values [layers, batch, max_len, kv_heads_on_this_rank, head_dim] for generation."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = shape[2]
        self.length = 0  # positions filled so far (advanced by the model after all layers ran)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [batch, new, kv_heads, head_dim]; return all keys/values so far."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, self.length : end] = k
        self.v[layer, :, self.length : end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


__all__ = [
    "INIT_STD",
    "DecoderLayer",
    "Embedding",
    "KVCache",
    "KilnLlama",
    "LMLoss",
    "Linear",
    "ModelConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "check_full_shapes",
    "full_shapes",
    "initial_weights",
    "positions_from_segments",
    "rope_inv_freq",
]
