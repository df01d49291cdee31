"""The Kiln decoder: a Llama-architecture transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP),
tensor-parallel through megatron-core, numerically the same as Hugging Face ``LlamaForCausalLM``.

Read top to bottom:

1. tensor-parallel plumbing: which layer class each projection uses, and how a full-size weight is sliced for
   a rank (``tp_split_dim``), shared by random init, HF import and HF export;
2. RoPE (all the Llama variants HF implements: default, linear, dynamic NTK, YaRN, Llama 3);
3. the blocks: RMSNorm, Attention, MLP, DecoderLayer;
4. ``KilnLlama``: embedding -> layers -> final norm -> LM head, returning logits or the loss;
5. ``KVCache`` for generation.

Layout: activations between layers are ``[seq, batch, hidden]`` (Megatron's convention, which its sequence
parallel collectives and our DeepSpeed pipeline stages assume); attention kernels take ``[batch, seq, heads,
head_dim]``. Parameter names are Hugging Face's without the leading ``model.`` (``layers.3.self_attn.q_proj.
weight``), so import/export is a rename, not a remap. q/k/v and gate/up stay separate projections (not one
fused qkv / gate-up matmul) for the same reason, and so that a contiguous row slice is always whole heads.

Tensor parallelism. With a TP process group the projections are megatron-core ``ColumnParallelLinear`` /
``RowParallelLinear`` / ``VocabParallelEmbedding`` (q/k/v/gate/up and the vocabulary split by output rows, o and
down split by input columns, one all-reduce after attention and one after the MLP) and the loss is
``vocab_parallel_cross_entropy``; the same holds for a 1-rank group. Without a group (``tp_group=None``: a laptop,
``kiln generate``, the HF round trip) the same module uses plain local layers with the same parameter names and
the same math, so no process group has to be created just to run a model. The tests check that the local path,
megatron at TP=1 and megatron at TP=2/3 all give Hugging Face's logits.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kiln import kernels
from kiln.config import ConfigError
from kiln.pretrain.config import ModelConfig

# ---------------------------------------------------------------------------------------------------------------
# 1. Tensor-parallel plumbing

# Which dimension of each full-size parameter is split across TP ranks (None: replicated on every rank).
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")


def tp_split_dim(name: str) -> int | None:
    """0 for column-parallel weights/biases and the vocabulary, 1 for row-parallel weights, None if replicated."""
    module = name.split(".")[-2]
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and name.endswith(".weight"):
        return 1
    return None  # norms, and row-parallel biases (added once, after the all-reduce)


def tp_slice(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's contiguous slice of a full-size parameter (whole heads per rank, since heads are contiguous)."""
    dim = tp_split_dim(name)
    if dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=dim)[tp_rank]


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


def default_tp_group() -> dist.ProcessGroup | None:
    """megatron parallel_state's TP group when it was initialised (the training launch), else None. Checked via
    sys.modules so that single-process use never imports megatron."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


class TensorParallel:
    """The TP group a model is split over (None = single process, local layers) and megatron's layer config."""

    def __init__(self, group: dist.ProcessGroup | None, cfg: ModelConfig, dtype: torch.dtype):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.sequence_parallel = cfg.sequence_parallel and self.size > 1
        self.megatron_config = None
        if group is not None:
            from megatron.core import ModelParallelConfig

            self.megatron_config = ModelParallelConfig(
                tensor_model_parallel_size=self.size,
                sequence_parallel=self.sequence_parallel,
                use_cpu_initialization=True,  # allocate on CPU; the weights come from init_weights or a checkpoint
                perform_initialization=False,
                params_dtype=dtype,
            )

    def column_linear(self, in_features: int, out_features: int, bias: bool, own_weight: bool = True) -> nn.Module:
        if self.group is None:
            return LocalLinear(in_features, out_features, bias, own_weight)
        return _megatron_layers()[0](
            in_features,
            out_features,
            config=self.megatron_config,
            init_method=_no_init,
            bias=bias,
            gather_output=False,
            skip_weight_param_allocation=not own_weight,
            tp_group=self.group,
        )

    def row_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if self.group is None:
            return LocalLinear(in_features, out_features, bias)
        return _megatron_layers()[1](
            in_features,
            out_features,
            config=self.megatron_config,
            init_method=_no_init,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.group,
        )

    def embedding(self, vocab_size: int, hidden: int) -> nn.Module:
        if self.group is None:
            return LocalEmbedding(vocab_size, hidden)
        return _megatron_layers()[2](
            vocab_size,
            hidden,
            init_method=_no_init,
            reduce_scatter_embeddings=self.sequence_parallel,
            config=self.megatron_config,
            tp_group=self.group,
        )


def _no_init(weight: torch.Tensor) -> None:
    """Layers are allocated empty; KilnLlama.init_weights (or a checkpoint) fills them."""


class LocalLinear(nn.Module):
    """y = x W^T + b on one process; ``forward(x, weight=...)`` serves a tied LM head (no weight of its own)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, own_weight: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features)) if own_weight else None
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight if weight is None else weight, self.bias)


class LocalEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


@functools.cache
def _megatron_layers():
    """megatron-core layers returning just the output (not (output, bias)), imported on first TP use: importing
    megatron.core takes seconds, which single-process users (``kiln generate``) should not pay."""
    from megatron.core import tensor_parallel as tpl

    class ColumnParallelLinear(tpl.ColumnParallelLinear):
        # megatron adds an always-None `_extra_state` entry to state dicts; plain torch behaviour keeps ours clean
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x, weight=None):
            return super().forward(x, weight)[0]

    class RowParallelLinear(tpl.RowParallelLinear):
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x):
            return super().forward(x)[0]

    return ColumnParallelLinear, RowParallelLinear, tpl.VocabParallelEmbedding


# ---------------------------------------------------------------------------------------------------------------
# 2. Rotary position embeddings


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
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
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
# 3. Blocks


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, backend: str, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden))
        self.eps, self.backend = eps, backend
        # Under sequence parallelism each rank sees a slice of the sequence, so this weight's gradient must be
        # all-reduced over the TP group; megatron's convention is to tag such parameters.
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with ``residual``: (norm(x + residual), x + residual) in one fused kernel."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual, backend=self.backend)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.n_heads = cfg.num_attention_heads // tp.size  # heads on this rank
        self.n_kv_heads = cfg.num_key_value_heads // tp.size
        self.backend = cfg.attention_backend
        self.rope_backend = "auto" if cfg.fused_kernels else "torch"
        q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = tp.column_linear(cfg.hidden_size, q_out, cfg.attention_bias)
        self.k_proj = tp.column_linear(cfg.hidden_size, kv_out, cfg.attention_bias)
        self.v_proj = tp.column_linear(cfg.hidden_size, kv_out, cfg.attention_bias)
        self.o_proj = tp.row_linear(q_out, cfg.hidden_size, cfg.attention_bias)

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
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.backend = "auto" if cfg.fused_kernels else "torch"
        self.gate_proj = tp.column_linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.up_proj = tp.column_linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = tp.row_linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer_idx: int):
        super().__init__()
        backend = "auto" if cfg.fused_kernels else "torch"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend, tp.sequence_parallel)
        self.self_attn = Attention(cfg, tp, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend, tp.sequence_parallel)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, cos, sin, segment_ids=None, kv_cache=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, kv_cache)
        normed, h = self.post_attention_layernorm(attn, residual=x)  # h = x + attn
        return h + self.mlp(normed)


# ---------------------------------------------------------------------------------------------------------------
# 4. The model


class KilnLlama(nn.Module):
    """Llama decoder. ``tp_group``: the tensor-parallel process group; "auto" (default) takes megatron
    parallel_state's TP group when initialised, else runs unsharded; None forces one process, no TP.

    ``init_seed``: fill the weights with the same full-size random init on every rank (each keeps its slice);
    None leaves them uninitialised for a checkpoint to fill (``kiln.pretrain.hf_io``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: dist.ProcessGroup | None | str = "auto",
        *,
        init_seed: int | None = 0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if isinstance(tp_group, str):
            if tp_group != "auto":
                raise ValueError(f"tp_group must be a process group, None or 'auto', got {tp_group!r}")
            tp_group = default_tp_group()
        self.tp = TensorParallel(tp_group, cfg, dtype)
        cfg.validate_tp(self.tp.size)
        if self.tp.sequence_parallel and not torch.cuda.is_available():
            raise ConfigError(
                "model.sequence_parallel needs CUDA: megatron-core's sequence-parallel collectives allocate their "
                "buffers on torch.cuda.current_device()"
            )
        backend = "auto" if cfg.fused_kernels else "torch"
        self.ce_backend = backend
        self.embed_tokens = self.tp.embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.tp, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend, self.tp.sequence_parallel)
        # A tied head reads embed_tokens.weight (both split the vocabulary the same way across ranks).
        self.lm_head = self.tp.column_linear(
            cfg.hidden_size, cfg.vocab_size, False, own_weight=not cfg.tie_word_embeddings
        )
        self.rotary = RotaryEmbedding(cfg)
        self.to(dtype)
        if init_seed is not None:
            self.init_weights(init_seed)

    # --- weights ---

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Normal(0, std) projections and embeddings, std / sqrt(2 * layers) for the residual outputs (o_proj,
        down_proj; GPT-2 / Megatron), ones for norms, zeros for biases. Every rank draws the same full tensors in
        the same order and keeps its slice, so the model is identical at any TP size."""
        gen = torch.Generator().manual_seed(seed)
        params = dict(self.named_parameters())
        out_std = std / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, shape in full_shapes(self.cfg).items():
            if name.endswith("norm.weight"):
                full = torch.ones(shape)
            elif name.endswith(".bias"):
                full = torch.zeros(shape)
            else:
                scale = out_std if tp_split_dim(name) == 1 else std
                full = torch.randn(shape, generator=gen) * scale
            params[name].copy_(tp_slice(name, full, self.tp.rank, self.tp.size))

    @torch.no_grad()
    def load_full_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full-size tensors (our names) into this rank's slices; shapes are checked first."""
        check_full_shapes(self.cfg, {k: tuple(v.shape) for k, v in tensors.items()})
        params = dict(self.named_parameters())
        for name, full in tensors.items():
            params[name].copy_(tp_slice(name, full, self.tp.rank, self.tp.size))

    @torch.no_grad()
    def full_state_dict(self, dst: int | None = None) -> dict[str, torch.Tensor]:
        """Full-size parameters (our names). At TP>1 the slices are gathered onto group rank ``dst`` (all ranks
        must call this; only that rank gets tensors, the others get an empty dict); ``dst=None`` gathers to all."""
        out = {}
        for name, p in self.named_parameters():
            dim = tp_split_dim(name)
            if self.tp.size == 1 or dim is None:
                out[name] = p.detach().clone()
                continue
            parts = [torch.empty_like(p) for _ in range(self.tp.size)]
            if dst is None:
                dist.all_gather(parts, p.detach().contiguous(), group=self.tp.group)
            else:
                root = dist.get_global_rank(self.tp.group, dst)
                dist.gather(
                    p.detach().contiguous(), parts if self.tp.rank == dst else None, dst=root, group=self.tp.group
                )
                if self.tp.rank != dst:
                    continue
            out[name] = torch.cat(parts, dim=dim)
        return out if (dst is None or self.tp.rank == dst or self.tp.size == 1) else {}

    # --- forward ---

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [seq, batch, hidden] ([seq/tp, batch, hidden] under sequence parallelism)."""
        if self.tp.sequence_parallel:
            return self.embed_tokens(input_ids)  # megatron transposes and reduce-scatters along the sequence
        return self.embed_tokens(input_ids).transpose(0, 1).contiguous()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [seq, batch, hidden] -> this rank's vocabulary slice [seq, batch, vocab/tp]."""
        weight = self.embed_tokens.weight if self.cfg.tie_word_embeddings else None
        return self.lm_head(self.norm(h), weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """input_ids [batch, seq] -> logits [batch, seq, vocab] (full vocabulary on every rank), or the loss.

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
        h = self.embed(input_ids)
        cos, sin = self.rotary(position_ids, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, segment_ids, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(s)
        logits = self.head(h)  # [seq, batch, vocab/tp]
        if labels is None:
            return self.gather_vocab(logits).transpose(0, 1)
        return self.loss(logits, labels, loss_mask, reduction)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Concatenate the vocabulary slices of all TP ranks (differentiable)."""
        if self.tp.size == 1:
            return logits
        return _GatherLastDim.apply(logits, self.tp.group)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask=None, reduction: str = "mean"):
        """Cross-entropy of [seq, batch, vocab/tp] logits against [batch, seq] labels, never gathering the vocab."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean | sum | none, got {reduction!r}")
        labels = labels.transpose(0, 1).contiguous()
        weight = (labels != -100).float()
        if loss_mask is not None:
            weight = weight * loss_mask.transpose(0, 1).float()
        if self.tp.size == 1:
            per_token = kernels.cross_entropy(logits, labels, reduction="none", backend=self.ce_backend)
        else:
            from megatron.core import parallel_state
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            # megatron's vocab-parallel loss reduces over parallel_state's TP group, not a group argument
            if parallel_state.get_tensor_model_parallel_group(check_initialized=False) is not self.tp.group:
                raise ValueError(
                    "the TP loss needs megatron parallel_state initialised with this model's TP group "
                    "(parallel_state.initialize_model_parallel(tensor_model_parallel_size=...))"
                )
            per_token = vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))
        per_token = per_token.view_as(weight) * weight
        if reduction == "none":
            return per_token.transpose(0, 1)
        total = per_token.sum()
        return total if reduction == "sum" else total / weight.sum().clamp(min=1)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        shape = (self.cfg.num_hidden_layers, batch, max_len, self.cfg.num_key_value_heads // self.tp.size)
        return KVCache(shape + (self.cfg.head_dim,), p.dtype, p.device)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension; backward keeps this rank's slice (every TP rank holds the same
    upstream gradient). Megatron's gather_from_tensor_model_parallel_region does this but allocates on CUDA."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        n, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=-1)[rank].contiguous(), None


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


# ---------------------------------------------------------------------------------------------------------------
# 5. KV cache


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
    "KilnLlama",
    "KVCache",
    "ModelConfig",
    "RotaryEmbedding",
    "check_full_shapes",
    "full_shapes",
    "positions_from_segments",
    "rope_inv_freq",
    "tp_slice",
    "tp_split_dim",
]
