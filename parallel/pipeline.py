"""Pipeline stages cut out of a ``KilnLlama``: a DeepSpeed ``PipelineModule`` whose layers hold the model's own
modules (no layer class or init is written twice).

Pipeline layers, in order (DeepSpeed names a parameter ``<layer index>.<name inside the layer>``):

====================  ==============================  =======================================================
layer                 holds (the model's own)         passes on
====================  ==============================  =======================================================
``EmbeddingStage``    ``embed_tokens``                ``(h [seq, batch, hidden], position_ids[, segment_ids])``
``DecoderStage`` x L  ``layers[i]`` (as ``layer``)    the same tuple
``FinalNormStage``    ``norm``                        ``h``
``LMHeadStage``       ``lm_head``                     logits ``[seq, batch, vocab / tp]``
====================  ==============================  =======================================================

With ``tie_word_embeddings`` the head is a second use of the embedding layer (a DeepSpeed ``TiedLayerSpec``
with key ``embed``): the first and last stage each hold ``embed_tokens.weight`` (as ``tied_modules.embed.*``)
and DeepSpeed all-reduces its gradient between them, marking the last stage's copy ``ds_pipe_replicated`` so
the gradient norm counts it once. Integer tensors (positions, document ids) travel with the activations;
DeepSpeed sends gradients only for floating-point ones.

The partition balances decoder layers (``type:DecoderStage``): the embedding joins the first stage, the final
norm and head the last. ``stage_partition`` computes the same split without building anything, which
``kiln.parallel.parallelize`` uses to materialise and initialise only this stage's modules before DeepSpeed
sees them. The loss is the model's own ``lm_loss`` (vocab-parallel at TP > 1) on the last stage.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn as nn

from kiln.pretrain.config import ModelConfig
from kiln.pretrain.model import DecoderLayer, KilnLlama, LMLoss, RotaryEmbedding

DECODER_STAGE_TYPE = "type:DecoderStage"


class EmbeddingStage(nn.Module):
    """The token embedding; with ``lm_head`` (tied embeddings) also the LM head without a weight of its own,
    which reads ``embed_tokens.weight`` (``tied_head_forward``) on the last stage."""

    def __init__(self, embed_tokens: nn.Module, lm_head: nn.Module | None = None):
        super().__init__()
        self.embed_tokens = embed_tokens
        if lm_head is not None:
            self.lm_head = lm_head

    def forward(self, inputs):
        input_ids, *rest = inputs
        return (self.embed_tokens(input_ids), *rest)


def tied_head_forward(stage: EmbeddingStage, h: torch.Tensor) -> torch.Tensor:
    """The last use of the tied embedding layer: logits = h @ embed_tokens.weight^T (this rank's vocab slice)."""
    return stage.lm_head(h, stage.embed_tokens.weight)


class DecoderStage(nn.Module):
    """One of the model's decoder layers taking and returning ``(h, position_ids[, segment_ids])``; RoPE is
    recomputed from the position ids (cheap) so that only small integer tensors, not cos/sin, travel between
    stages."""

    def __init__(self, layer: DecoderLayer, rotary: RotaryEmbedding):
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, inputs):
        h, position_ids, *segments = inputs
        cos, sin = self.rotary(position_ids, h.dtype)
        return (self.layer(h, cos, sin, segments[0] if segments else None), position_ids, *segments)


class FinalNormStage(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs):
        return self.norm(inputs[0])


class LMHeadStage(nn.Module):
    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, h):
        return self.lm_head(h)


class PipelineLoss:
    """``loss_fn(logits, (labels, loss_mask))`` for DeepSpeed: the model's ``lm_loss`` (token mean of one
    micro-batch), or with ``scale`` set (a 0-dim tensor, per step, by the train module) the micro-batch's summed
    loss times ``scale`` (a loss normalised over the whole step's tokens). A plain callable, not a module, so
    DeepSpeed does not register it as a submodule."""

    def __init__(self, lm_loss: LMLoss):
        self.lm_loss = lm_loss
        self.scale: torch.Tensor | None = None
        self.__name__ = "PipelineLoss"

    def __call__(self, logits: torch.Tensor, targets) -> torch.Tensor:
        labels, loss_mask = targets
        if self.scale is None:
            return self.lm_loss(logits, labels, loss_mask)
        return self.lm_loss(logits, labels, loss_mask, reduction="sum") * self.scale.to(logits.device)


@functools.cache
def _built_tied_spec():
    """DeepSpeed's ``TiedLayerSpec`` builds its module from a class; this one hands over a module already built
    (the model's), so the first and the last stage share the model's own embedding."""
    from deepspeed.pipe import TiedLayerSpec

    class BuiltTiedLayerSpec(TiedLayerSpec):
        def __init__(self, key: str, module: nn.Module, *, forward_fn=None, tied_weight_attr: str):
            super().__init__(key, type(module), forward_fn=forward_fn, tied_weight_attr=tied_weight_attr)
            self.module = module

        def build(self, log=False):
            return self.module

    return BuiltTiedLayerSpec


def pipeline_layers(model: KilnLlama) -> list:
    """The pipeline layers of ``model`` (modules and tied specs over the model's own modules), in order."""
    cfg = model.cfg
    tied = cfg.tie_word_embeddings
    layers: list = []
    if tied:
        tied_spec = _built_tied_spec()
        embed = EmbeddingStage(model.embed_tokens, model.lm_head)
        layers.append(tied_spec("embed", embed, tied_weight_attr="embed_tokens.weight"))
    else:
        layers.append(EmbeddingStage(model.embed_tokens))
    layers += [DecoderStage(layer, model.rotary) for layer in model.layers]
    layers.append(FinalNormStage(model.norm))
    if tied:
        layers.append(tied_spec("embed", embed, forward_fn=tied_head_forward, tied_weight_attr="embed_tokens.weight"))
    else:
        layers.append(LMHeadStage(model.lm_head))
    return layers


def stage_modules(model: KilnLlama, pp: int, pp_rank: int) -> list[nn.Module]:
    """The model's modules that pipeline stage ``pp_rank`` of ``pp`` holds (the last stage also holds the
    embedding when it is tied): the only ones ``parallelize`` materialises on this rank."""
    parts = stage_partition(model.cfg, pp)
    n = model.cfg.num_hidden_layers
    out: list[nn.Module] = []
    for idx in range(parts[pp_rank], parts[pp_rank + 1]):
        if idx == 0:
            out.append(model.embed_tokens)
        elif idx <= n:
            out.append(model.layers[idx - 1])
        elif idx == n + 1:
            out.append(model.norm)
        else:
            out += [model.embed_tokens, model.lm_head] if model.cfg.tie_word_embeddings else [model.lm_head]
    return out


def cut_pipeline(model: KilnLlama, topology) -> nn.Module:
    """The DeepSpeed ``PipelineModule`` over ``model``'s own modules on ``topology`` (DeepSpeed's
    ``PipeModelDataParallelTopology``). This rank's stage must already be materialised (``PipelineModule``
    moves its modules to the device and broadcasts the tied embedding while it is built)."""
    from deepspeed.pipe import PipelineModule

    module = PipelineModule(
        layers=pipeline_layers(model),
        topology=topology,
        loss_fn=PipelineLoss(model.lm_loss),
        partition_method=DECODER_STAGE_TYPE,
    )
    expected = stage_partition(model.cfg, topology.get_dim("pipe"))
    if list(module.parts) != expected:
        raise RuntimeError(f"DeepSpeed partitioned the pipeline as {list(module.parts)}, expected {expected}")
    return module


_LAYER_NAME = re.compile(r"^(\d+)\.(.+)$")


def model_param_name(pipeline_name: str, num_layers: int) -> str:
    """PipelineModule parameter name -> KilnLlama (= Hugging Face without ``model.``) name.

    ``0.embed_tokens.weight`` / ``tied_modules.embed.embed_tokens.weight`` -> ``embed_tokens.weight``;
    ``<1+i>.layer.self_attn.q_proj.weight`` -> ``layers.<i>.self_attn.q_proj.weight``; ``<L+1>.norm.weight``
    -> ``norm.weight``; ``<L+2>.lm_head.weight`` -> ``lm_head.weight``.
    """
    if pipeline_name.startswith("tied_modules.embed."):
        return pipeline_name[len("tied_modules.embed.") :]
    m = _LAYER_NAME.match(pipeline_name)
    if m is None:
        raise ValueError(f"not a pipeline parameter name: {pipeline_name!r}")
    idx, rest = int(m.group(1)), m.group(2)
    if 1 <= idx <= num_layers:
        if not rest.startswith("layer."):
            raise ValueError(f"not a pipeline parameter name: {pipeline_name!r}")
        return f"layers.{idx - 1}.{rest[len('layer.') :]}"
    return rest


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
    "cut_pipeline",
    "model_param_name",
    "pipeline_layers",
    "stage_layer_names",
    "stage_modules",
    "stage_partition",
]
