"""Tensor parallelism for ``KilnLlama``, applied from outside by a plan.

``TP_PLAN`` is the whole of what changes when a model is split over a TP group: a table from module-name
pattern (``fnmatch``; ``*`` stands for a layer index) to a style. ``apply_tensor_parallel`` walks the model,
and for every module a pattern names, does what its style says:

=========================  ==================================================================================
style                      what this rank ends up with
=========================  ==================================================================================
``column``                 megatron ``ColumnParallelLinear``: this rank's rows of the weight (and bias), no
                           gather of the output (q/k/v, gate/up: whole heads / equal MLP slices per rank)
``row``                    megatron ``RowParallelLinear``: this rank's columns of the weight, one all-reduce
                           of the output; the bias stays whole (added once, after the all-reduce)
``vocab_embedding``        megatron ``VocabParallelEmbedding``: this rank's rows of the vocabulary
``vocab_head``             a column-parallel LM head: this rank's vocabulary slice of the logits; tied, it
                           reads the vocab-parallel embedding's weight (both split the vocabulary alike)
``vocab_loss``             ``VocabParallelLoss``: megatron's vocab-parallel cross-entropy over the slices
``vocab_gather``           ``GatherVocab``: all-gather of the vocabulary slices (only when logits are returned)
``heads``                  the attention's head counts divided by the TP size
``sequence_parallel_norm`` under sequence parallelism the norm's weight is tagged (its gradient is partial)
=========================  ==================================================================================

The same table decides how a full-size tensor is split (``tp_split_dim``), so random init, HF import / export
and checkpoints slice and gather exactly the way the layers were swapped.

megatron-core specifics (they work; keep them): layers are built with ``ModelParallelConfig(
use_cpu_initialization=True, perform_initialization=False)`` (allocated empty on the CPU, filled from the plain
weight, ``kiln.pretrain.model.initial_weights`` or a checkpoint) and an explicit ``tp_group``; their
``forward`` returns ``(output, bias)``, which the subclasses below reduce to the output; and megatron's
always-None ``_extra_state`` entries are kept out of state dicts, so names stay the plain model's. Its
vocab-parallel cross-entropy reduces over ``parallel_state``'s TP group, not an argument, so that group must be
the model's (checked). megatron is imported on first use: single-process users never pay for it.
"""

from __future__ import annotations

import fnmatch
import functools
import sys
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from kiln.pretrain.model import KilnLlama, LMLoss, check_full_shapes

TP_PLAN: dict[str, str] = {
    "embed_tokens": "vocab_embedding",
    "layers.*.input_layernorm": "sequence_parallel_norm",
    "layers.*.self_attn": "heads",
    "layers.*.self_attn.q_proj": "column",
    "layers.*.self_attn.k_proj": "column",
    "layers.*.self_attn.v_proj": "column",
    "layers.*.self_attn.o_proj": "row",
    "layers.*.post_attention_layernorm": "sequence_parallel_norm",
    "layers.*.mlp.gate_proj": "column",
    "layers.*.mlp.up_proj": "column",
    "layers.*.mlp.down_proj": "row",
    "norm": "sequence_parallel_norm",
    "lm_head": "vocab_head",
    "lm_loss": "vocab_loss",
    "gather_logits": "vocab_gather",
}

# style -> (split dimension of the full-size weight, of the bias); None: the tensor is whole on every rank
_SPLIT_DIMS: dict[str, tuple[int | None, int | None]] = {
    "column": (0, 0),
    "row": (1, None),
    "vocab_embedding": (0, None),
    "vocab_head": (0, 0),
}


@functools.lru_cache(maxsize=4096)
def _style(module_name: str, plan_items: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, style in plan_items:
        if fnmatch.fnmatchcase(module_name, pattern):
            return style
    return None


def tp_style(module_name: str, plan: dict[str, str] = TP_PLAN) -> str | None:
    """The plan's style for a KilnLlama module name (the first pattern that matches), or None."""
    return _style(module_name, tuple(plan.items()))


def tp_split_dim(name: str, plan: dict[str, str] = TP_PLAN) -> int | None:
    """Which dimension of the full-size parameter ``name`` (a KilnLlama name) is split across TP ranks: 0 for
    column-parallel weights/biases and the vocabulary, 1 for row-parallel weights, None if replicated (norms,
    row-parallel biases)."""
    module, _, kind = name.rpartition(".")
    dims = _SPLIT_DIMS.get(tp_style(module, plan) or "")
    if dims is None:
        return None
    return dims[0] if kind == "weight" else dims[1]


def tp_slice(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's contiguous slice of a full-size parameter (whole heads per rank, since heads are contiguous)."""
    dim = tp_split_dim(name)
    if dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=dim)[tp_rank]


def default_tp_group() -> dist.ProcessGroup | None:
    """megatron parallel_state's TP group when it was initialised (a training launch, ``run_distributed(tp=)``),
    else None. Checked via sys.modules so that single-process use never imports megatron."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


# ---------------------------------------------------------------------------------------------------------------
# the modules the plan swaps in


class VocabParallelLoss(LMLoss):
    """``LMLoss`` over this rank's vocabulary slice: megatron's ``vocab_parallel_cross_entropy`` (a max and a sum
    all-reduced over the TP group; the full logits are never built). Masking and reduction are LMLoss's."""

    def __init__(self, backend: str, tp_group: dist.ProcessGroup):
        super().__init__(backend)
        self.tp_group = tp_group

    def per_token(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # megatron's vocab-parallel loss reduces over parallel_state's TP group, not a group argument
        if parallel_state.get_tensor_model_parallel_group(check_initialized=False) is not self.tp_group:
            raise ValueError(
                "the TP loss needs megatron parallel_state initialised with this model's TP group "
                "(parallel_state.initialize_model_parallel(tensor_model_parallel_size=...))"
            )
        return vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))


class GatherVocab(nn.Module):
    """Logits [seq, batch, vocab / tp] -> [seq, batch, vocab]: concatenate every TP rank's slice (differentiable)."""

    def __init__(self, tp_group: dist.ProcessGroup):
        super().__init__()
        self.tp_group = tp_group

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if dist.get_world_size(self.tp_group) == 1:
            return logits
        return _GatherLastDim.apply(logits, self.tp_group)


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


def _no_init(weight: torch.Tensor) -> None:
    """megatron layers are allocated empty; the plain weight, the init or a checkpoint fills them."""


@functools.cache
def _megatron_layers():
    """megatron-core layers taking and returning what the plain layers do (imported on first TP use: importing
    megatron.core takes seconds)."""
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

    class VocabParallelEmbedding(tpl.VocabParallelEmbedding):
        def forward(self, ids):
            # [batch, seq] -> [seq, batch, hidden] like kiln.pretrain.model.Embedding; with sequence parallelism
            # megatron transposes and reduce-scatters along the sequence itself ([seq / tp, batch, hidden])
            out = super().forward(ids)
            return out if self.reduce_scatter_embeddings else out.transpose(0, 1).contiguous()

    return ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


class _Swap:
    """What one ``apply_tensor_parallel`` call needs to build a style's replacement for a plain module."""

    def __init__(self, group: dist.ProcessGroup, dtype: torch.dtype, sequence_parallel: bool):
        from megatron.core import ModelParallelConfig

        self.group, self.size, self.sequence_parallel = group, dist.get_world_size(group), sequence_parallel
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.size,
            sequence_parallel=sequence_parallel,
            use_cpu_initialization=True,  # allocate on CPU, empty: the weights are copied in below or initialised
            perform_initialization=False,
            params_dtype=dtype,
        )

    def column(self, m: nn.Module) -> nn.Module:
        return _megatron_layers()[0](
            m.in_features,
            m.out_features,
            config=self.config,
            init_method=_no_init,
            bias=m.bias is not None,
            gather_output=False,
            skip_weight_param_allocation=m.weight is None,  # a tied head: forward(x, weight=embedding weight)
            tp_group=self.group,
        )

    vocab_head = column

    def row(self, m: nn.Module) -> nn.Module:
        return _megatron_layers()[1](
            m.in_features,
            m.out_features,
            config=self.config,
            init_method=_no_init,
            bias=m.bias is not None,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.group,
        )

    def vocab_embedding(self, m: nn.Module) -> nn.Module:
        return _megatron_layers()[2](
            m.num_embeddings,
            m.embedding_dim,
            init_method=_no_init,
            reduce_scatter_embeddings=self.sequence_parallel,
            config=self.config,
            tp_group=self.group,
        )

    def vocab_loss(self, m: nn.Module) -> nn.Module:
        return VocabParallelLoss(m.backend, self.group)

    def vocab_gather(self, m: nn.Module) -> nn.Module:
        return GatherVocab(self.group)

    def heads(self, m: nn.Module) -> None:
        m.n_heads //= self.size
        m.n_kv_heads //= self.size

    def sequence_parallel_norm(self, m: nn.Module) -> None:
        # Each rank normalises a slice of the sequence, so this weight's gradient is partial over the TP group;
        # megatron's convention is to tag such parameters.
        m.weight.sequence_parallel = self.sequence_parallel


@torch.no_grad()
def apply_tensor_parallel(
    model: KilnLlama,
    tp_group: dist.ProcessGroup,
    *,
    sequence_parallel: bool = False,
    plan: dict[str, str] = TP_PLAN,
) -> None:
    """Split ``model`` in place over ``tp_group`` by ``plan``. Where the plain module holds real weights, this
    rank's slice of them is copied into the replacement (``tp_slice``); where it is on the meta device the
    replacement is left empty for ``initial_weights`` or a checkpoint. Parameter names do not change."""
    dtype = next(model.parameters()).dtype
    swap = _Swap(tp_group, dtype, sequence_parallel)
    rank = dist.get_rank(tp_group)
    for name, module in list(model.named_modules()):
        style = tp_style(name, plan)
        if style is None:
            continue
        new = getattr(swap, style)(module)
        if new is None:  # changed in place
            continue
        for pname, p in new.named_parameters():
            old = getattr(module, pname, None)
            if old is not None and not old.is_meta:
                p.copy_(tp_slice(f"{name}.{pname}", old.detach(), rank, swap.size))
        model.set_submodule(name, new)


def mark_tensor_parallel_params(
    module: nn.Module, tp_size: int, model_name: Callable[[str], str] = lambda name: name
) -> int:
    """Set megatron's ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` on every parameter
    that is split across TP ranks (``tp_split_dim`` of its KilnLlama name, which ``model_name`` maps a local
    name to), and ``tensor_model_parallel = False`` on the replicated ones, so that DeepSpeed's gradient norm
    counts each element exactly once (megatron's layers only set these when they initialise their own weights,
    which ours do not). Returns how many parameters are TP-sharded."""
    sharded = 0
    for name, p in module.named_parameters():
        dim = tp_split_dim(model_name(name)) if tp_size > 1 else None
        p.tensor_model_parallel = dim is not None
        if dim is not None:
            p.partition_dim, p.partition_stride = dim, 1
            sharded += 1
    return sharded


# ---------------------------------------------------------------------------------------------------------------
# full-size weights in and out of a (possibly split) KilnLlama


def tp_group_of(model: nn.Module) -> dist.ProcessGroup | None:
    """The TP group ``model`` was split over (its swapped-in layers carry it), or None for a plain model."""
    for m in model.modules():
        group = getattr(m, "tp_group", None)
        if group is not None:
            return group
    return None


def _rank_size(model: nn.Module) -> tuple[dist.ProcessGroup | None, int, int]:
    group = tp_group_of(model)
    if group is None:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


@torch.no_grad()
def copy_full_tensors(model: KilnLlama, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each full-size ``(name, tensor)`` into this rank's slice of parameter ``name``, skipping parameters
    still on the meta device (another pipeline stage's). Streams: ``tensors`` may be a generator such as
    ``initial_weights``, so only one full tensor is alive at a time."""
    _, rank, size = _rank_size(model)
    params = dict(model.named_parameters())
    for name, full in tensors:
        p = params[name]
        if not p.is_meta:
            p.copy_(tp_slice(name, full, rank, size))


def load_full_state_dict(model: KilnLlama, tensors: dict[str, torch.Tensor]) -> None:
    """Full-size tensors (KilnLlama names) into a plain or TP-split model: every rank passes the same full
    tensors and keeps its slice. Shapes are checked against the config first."""
    check_full_shapes(model.cfg, {k: tuple(v.shape) for k, v in tensors.items()})
    copy_full_tensors(model, tensors.items())


@torch.no_grad()
def full_state_dict(model: KilnLlama, dst: int | None = None) -> dict[str, torch.Tensor]:
    """Full-size parameters (KilnLlama names) of a plain or TP-split model. Split ones are gathered over the TP
    group onto group rank ``dst`` (every rank must call this; the others get an empty dict); ``dst=None``
    gathers to all ranks."""
    group, rank, size = _rank_size(model)
    out = {}
    for name, p in model.named_parameters():
        dim = tp_split_dim(name)
        if size == 1 or dim is None:
            out[name] = p.detach().clone()
            continue
        parts = [torch.empty_like(p) for _ in range(size)]
        if dst is None:
            dist.all_gather(parts, p.detach().contiguous(), group=group)
        else:
            root = dist.get_global_rank(group, dst)
            dist.gather(p.detach().contiguous(), parts if rank == dst else None, dst=root, group=group)
            if rank != dst:
                continue
        out[name] = torch.cat(parts, dim=dim)
    return out if (dst is None or rank == dst or size == 1) else {}


__all__ = [
    "TP_PLAN",
    "GatherVocab",
    "VocabParallelLoss",
    "apply_tensor_parallel",
    "copy_full_tensors",
    "default_tp_group",
    "full_state_dict",
    "load_full_state_dict",
    "mark_tensor_parallel_params",
    "tp_group_of",
    "tp_slice",
    "tp_split_dim",
    "tp_style",
]
