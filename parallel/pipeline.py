"""KilnLlama as a DeepSpeed ``PipelineModule``: the same blocks as ``kiln.pretrain.model``, cut into pipeline layers.

Pipeline layers, in order (DeepSpeed names a parameter ``<layer index>.<name inside the layer>``):

====================  ==============================  =======================================================
layer                 holds                           passes on
====================  ==============================  =======================================================
``EmbeddingStage``    ``embed_tokens``                ``(h [seq, batch, hidden], position_ids[, segment_ids])``
``DecoderStage`` x L  one ``DecoderLayer``            the same tuple
``FinalNormStage``    ``norm``                        ``h``
``LMHeadStage``       ``lm_head``                     logits ``[seq, batch, vocab / tp]``
====================  ==============================  =======================================================

With ``tie_word_embeddings`` the head is a second use of the embedding layer (a DeepSpeed ``TiedLayerSpec`` with
key ``embed``): the first and last stage each hold ``embed_tokens.weight`` (as ``tied_modules.embed.*``) and
DeepSpeed all-reduces its gradient between them, marking the last stage's copy ``ds_pipe_replicated`` so the
gradient norm counts it once. Integer tensors (positions, document ids) travel with the activations; DeepSpeed
sends gradients only for floating-point ones.

The partition balances decoder layers (``type:DecoderStage``): the embedding joins the first stage, the final
norm and head the last. The loss is ``KilnLlama.loss`` (vocab-parallel cross-entropy at TP > 1) on the last stage.

Every rank draws the same full-size initial weights as ``KilnLlama.init_weights`` (same generator, same order)
and keeps its stage's TP slices, so a run at any layout starts from the model a 1-rank run starts from.
"""

from __future__ import annotations

import functools
import math
import re

import torch
import torch.nn as nn

from kiln.pretrain.config import ModelConfig
from kiln.pretrain.model import (
    DecoderLayer,
    KilnLlama,
    RMSNorm,
    RotaryEmbedding,
    TensorParallel,
    full_shapes,
    tp_slice,
    tp_split_dim,
)

DECODER_STAGE_TYPE = "type:DecoderStage"


def _backend(cfg: ModelConfig) -> str:
    return "auto" if cfg.fused_kernels else "torch"


class EmbeddingStage(nn.Module):
    """Token embedding; with ``tied_head`` also an LM head without a weight of its own (it reads
    ``embed_tokens.weight``, which splits the vocabulary across TP ranks exactly as a column-parallel head)."""

    def __init__(self, cfg: ModelConfig, tp_group, dtype: torch.dtype, tied_head: bool = False):
        super().__init__()
        self.tp = TensorParallel(tp_group, cfg, dtype)
        self.embed_tokens = self.tp.embedding(cfg.vocab_size, cfg.hidden_size)
        if tied_head:
            self.lm_head = self.tp.column_linear(cfg.hidden_size, cfg.vocab_size, False, own_weight=False)

    def forward(self, inputs):
        input_ids, *rest = inputs
        return (self.embed_tokens(input_ids).transpose(0, 1).contiguous(), *rest)


def tied_head_forward(stage: EmbeddingStage, h: torch.Tensor) -> torch.Tensor:
    """The last use of the tied embedding layer: logits = h @ embed_tokens.weight^T (this rank's vocab slice)."""
    return stage.lm_head(h, stage.embed_tokens.weight)


class DecoderStage(DecoderLayer):
    """One decoder layer taking and returning ``(h, position_ids[, segment_ids])``; RoPE is recomputed from the
    position ids (cheap) so that only small integer tensors, not cos/sin, travel between stages."""

    def __init__(self, cfg: ModelConfig, tp_group, dtype: torch.dtype, layer_idx: int):
        super().__init__(cfg, TensorParallel(tp_group, cfg, dtype), layer_idx)
        self.rotary = RotaryEmbedding(cfg)

    def forward(self, inputs):
        h, position_ids, *segments = inputs
        cos, sin = self.rotary(position_ids, h.dtype)
        return (super().forward(h, cos, sin, segments[0] if segments else None), position_ids, *segments)


class FinalNormStage(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, _backend(cfg), sequence_parallel=False)

    def forward(self, inputs):
        return self.norm(inputs[0])


class LMHeadStage(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, dtype: torch.dtype):
        super().__init__()
        self.tp = TensorParallel(tp_group, cfg, dtype)
        self.lm_head = self.tp.column_linear(cfg.hidden_size, cfg.vocab_size, False)

    def forward(self, h):
        return self.lm_head(h)


class PipelineLoss:
    """``loss_fn(logits, (labels, loss_mask))`` for DeepSpeed: token-mean cross-entropy of one micro-batch,
    computed by ``KilnLlama.loss`` itself (this object has the two attributes that method reads)."""

    loss = KilnLlama.loss

    def __init__(self, cfg: ModelConfig, tp_group, dtype: torch.dtype):
        self.tp = TensorParallel(tp_group, cfg, dtype)
        self.ce_backend = _backend(cfg)
        self.__name__ = "PipelineLoss"

    def __call__(self, logits: torch.Tensor, targets) -> torch.Tensor:
        labels, loss_mask = targets
        return self.loss(logits, labels, loss_mask)


def layer_specs(cfg: ModelConfig, tp_group, dtype: torch.dtype) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tied = cfg.tie_word_embeddings
    if tied:
        embed = TiedLayerSpec(
            "embed", EmbeddingStage, cfg, tp_group, dtype, True, tied_weight_attr="embed_tokens.weight"
        )
    else:
        embed = LayerSpec(EmbeddingStage, cfg, tp_group, dtype)
    specs = [embed]
    specs += [LayerSpec(DecoderStage, cfg, tp_group, dtype, i) for i in range(cfg.num_hidden_layers)]
    specs.append(LayerSpec(FinalNormStage, cfg))
    if tied:
        specs.append(
            TiedLayerSpec(
                "embed",
                EmbeddingStage,
                cfg,
                tp_group,
                dtype,
                True,
                forward_fn=tied_head_forward,
                tied_weight_attr="embed_tokens.weight",
            )
        )
    else:
        specs.append(LayerSpec(LMHeadStage, cfg, tp_group, dtype))
    return specs


def build_pipeline(
    cfg: ModelConfig,
    ctx,
    *,
    init_seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
):
    """The DeepSpeed ``PipelineModule`` for ``cfg`` on ``ctx``'s topology, weights initialised as KilnLlama's."""
    from deepspeed.pipe import PipelineModule

    checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    module = PipelineModule(
        layers=layer_specs(cfg, ctx.tp_group, dtype),
        topology=ctx.topology,
        loss_fn=PipelineLoss(cfg, ctx.tp_group, dtype),
        partition_method=DECODER_STAGE_TYPE,
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=checkpoint_fn,
        checkpointable_layers=["DecoderStage"],
    )
    module.to(dtype)
    expected = stage_partition(cfg, ctx.layout.pp)
    if list(module.parts) != expected:
        raise RuntimeError(f"DeepSpeed partitioned the pipeline as {list(module.parts)}, expected {expected}")
    if init_seed is not None:
        init_pipeline_weights(module, cfg, init_seed, ctx.tp_rank, ctx.layout.tp)
    return module


_LAYER_NAME = re.compile(r"^(\d+)\.(.+)$")


def model_param_name(pipeline_name: str, num_layers: int) -> str:
    """PipelineModule parameter name -> KilnLlama (= Hugging Face without ``model.``) name.

    ``0.embed_tokens.weight`` / ``tied_modules.embed.embed_tokens.weight`` -> ``embed_tokens.weight``;
    ``<1+i>.self_attn.q_proj.weight`` -> ``layers.<i>.self_attn.q_proj.weight``; ``<L+1>.norm.weight`` ->
    ``norm.weight``; ``<L+2>.lm_head.weight`` -> ``lm_head.weight``.
    """
    if pipeline_name.startswith("tied_modules.embed."):
        return pipeline_name[len("tied_modules.embed.") :]
    m = _LAYER_NAME.match(pipeline_name)
    if m is None:
        raise ValueError(f"not a pipeline parameter name: {pipeline_name!r}")
    idx, rest = int(m.group(1)), m.group(2)
    if 1 <= idx <= num_layers:
        return f"layers.{idx - 1}.{rest}"
    return rest


@torch.no_grad()
def init_pipeline_weights(module: nn.Module, cfg: ModelConfig, seed: int, tp_rank: int, tp_size: int) -> None:
    """KilnLlama.init_weights for the parameters this rank holds: every full tensor is drawn in the same order
    from the same generator (also the ones other stages own, to keep the stream aligned) and sliced for TP."""
    local: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        local.setdefault(model_param_name(name, cfg.num_hidden_layers), []).append(p)
    gen = torch.Generator().manual_seed(seed)
    std = 0.02
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
    for name, shape in full_shapes(cfg).items():
        if name.endswith("norm.weight"):
            full = torch.ones(shape)
        elif name.endswith(".bias"):
            full = torch.zeros(shape)
        else:
            full = torch.randn(shape, generator=gen) * (out_std if tp_split_dim(name) == 1 else std)
        for p in local.get(name, ()):
            p.copy_(tp_slice(name, full, tp_rank, tp_size))


def stage_partition(cfg: ModelConfig, pp: int) -> list[int]:
    """DeepSpeed's layer boundaries for ``pp`` stages (``parts[s]:parts[s+1]`` are stage s's pipeline layers),
    computed without building anything: the same balanced split of decoder layers PipelineModule makes."""
    from deepspeed.runtime import utils as ds_utils

    n_layers = cfg.num_hidden_layers + 3
    weights = [0] + [1] * cfg.num_hidden_layers + [0, 0]
    parts = ds_utils.partition_balanced(weights=weights, num_parts=pp)
    assert len(parts) == pp + 1 and parts[-1] == n_layers
    return parts


def stage_layer_names(cfg: ModelConfig) -> list[str]:
    """Human-readable name of each pipeline layer, for the dry-run partition table."""
    names = ["embed_tokens"] + [f"layers.{i}" for i in range(cfg.num_hidden_layers)] + ["norm"]
    names.append("lm_head (tied to embed_tokens)" if cfg.tie_word_embeddings else "lm_head")
    return names


__all__ = [
    "DecoderStage",
    "EmbeddingStage",
    "FinalNormStage",
    "LMHeadStage",
    "PipelineLoss",
    "build_pipeline",
    "init_pipeline_weights",
    "layer_specs",
    "model_param_name",
    "stage_partition",
    "stage_layer_names",
]
