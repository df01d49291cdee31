"""``--dry-run``: the pipeline partition and a per-rank memory estimate, computed from the recipe alone.

Nothing is allocated: parameter counts come from ``kiln.pretrain.model.full_shapes`` and the partition from the same
``partition_balanced`` call DeepSpeed's ``PipelineModule`` makes. Ranks of one pipeline stage hold the same
amount (TP splits evenly, DP ranks are replicas or equal ZeRO shards), so the table has one row per stage.

Bytes per parameter (P = parameters this rank holds, D = data-parallel size):

=========  ==================  ==============================  ==========================================
precision  weights             gradients                       optimizer (AdamW)
=========  ==================  ==============================  ==========================================
fp32       4 P                 4 P                             8 P (m, v)
bf16       2 P                 2 P + 4 P fp32 accumulation     12 P (fp32 master, m, v)
=========  ==================  ==============================  ==========================================

ZeRO 1 divides the optimizer column by D, ZeRO 2 also the gradients' fp32 part, ZeRO 3 also the weights.

Activations per decoder layer and micro-batch (b samples of s tokens, hidden h, q width hq, kv width hkv,
MLP width I, TP size t), counting the tensors autograd keeps with a fused (flash / memory-efficient)
attention that stores no ``s x s`` scores: ``s b (4 h + (2 hq + 2 hkv + 3 I) / t)`` elements. With activation
checkpointing only each layer's input ``s b h`` stays, plus one layer's working set during recomputation. With
1F1B pipelining stage ``k`` of ``P`` holds up to ``min(P - k, micro-batches)`` micro-batches in flight. The
last stage adds fp32 logits and their gradient, ``2 x 4 s b V / t`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.parallel.layout import Layout
from kiln.parallel.tensor_parallel import tp_split_dim
from kiln.pretrain.model import full_shapes
from kiln.pretrain.recipe import TrainRecipe

GIB = 1024**3


@dataclass
class StageEstimate:
    stage: int
    layers: list[str]
    params: int  # on one rank of this stage (its TP slice)
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes


def pipeline_layer_params(recipe: TrainRecipe) -> list[list[str]]:
    """Full parameter names held by each pipeline layer (embed, decoder layers, final norm, head)."""
    cfg = recipe.model
    names = list(full_shapes(cfg))
    layers: list[list[str]] = [["embed_tokens.weight"]]
    for i in range(cfg.num_hidden_layers):
        layers.append([n for n in names if n.startswith(f"layers.{i}.")])
    layers.append(["norm.weight"])
    layers.append(["embed_tokens.weight"] if cfg.tie_word_embeddings else ["lm_head.weight"])
    return layers


def estimate(recipe: TrainRecipe, layout: Layout) -> list[StageEstimate]:
    from kiln.parallel.pipeline import stage_layer_names, stage_partition

    cfg, p = recipe.model, recipe.parallel
    shapes = full_shapes(cfg)
    parts = stage_partition(cfg, layout.pp)
    layer_params = pipeline_layer_params(recipe)
    layer_names = stage_layer_names(cfg)
    bf16 = recipe.precision == "bf16"
    act_elem = 2 if bf16 else 4
    d = layout.dp
    s, b, t = recipe.seq_length, p.micro_batch, layout.tp
    hq, hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = s * b * (4 * cfg.hidden_size + (2 * hq + 2 * hkv + 3 * cfg.intermediate_size) / t) * act_elem
    micro_batches = recipe.parallel.global_batch // (p.micro_batch * d)
    out = []
    for stage in range(layout.pp):
        lo, hi = parts[stage], parts[stage + 1]
        held: list[str] = []
        for idx in range(lo, hi):
            if layout.pp == 1 and idx == len(layer_params) - 1 and cfg.tie_word_embeddings:
                continue  # one copy of a tied embedding without pipelining
            held += layer_params[idx]
        n = sum(_numel(shapes[name]) // (t if tp_split_dim(name) is not None else 1) for name in held)
        weights = (2 if bf16 else 4) * n
        grads_16, grads_32 = (2 * n, 4 * n) if bf16 else (0, 4 * n)
        optimizer = (12 if bf16 else 8) * n
        if p.zero_stage >= 1:
            optimizer /= d
        if p.zero_stage >= 2:
            grads_32 /= d
        if p.zero_stage >= 3:
            weights /= d
        n_decoder = sum(1 for idx in range(lo, hi) if 1 <= idx <= cfg.num_hidden_layers)
        in_flight = min(layout.pp - stage, micro_batches)
        if p.activation_checkpointing:
            acts = in_flight * n_decoder * s * b * cfg.hidden_size * act_elem + per_layer
        else:
            acts = in_flight * n_decoder * per_layer
        if stage == layout.pp - 1:
            acts += 2 * 4 * s * b * cfg.vocab_size / t
        out.append(StageEstimate(stage, layer_names[lo:hi], n, weights, grads_16 + grads_32, optimizer, float(acts)))
    return out


def _layer_range(names: list[str]) -> str:
    decoder = [n for n in names if n.startswith("layers.")]
    others = [n for n in names if not n.startswith("layers.")]
    parts = []
    if names and names[0] == "embed_tokens":
        parts.append("embed_tokens")
        others = others[1:]
    if decoder:
        first, last = decoder[0].split(".")[1], decoder[-1].split(".")[1]
        parts.append(f"layers {first}-{last}" if first != last else f"layer {first}")
    parts += others
    return ", ".join(parts)


def dry_run_report(recipe: TrainRecipe, layout: Layout) -> str:
    cfg, p = recipe.model, recipe.parallel
    total = sum(_numel(shape) for shape in full_shapes(cfg).values())
    gb = recipe.global_batch_at(0)
    lines = [
        f"layout {layout} = {layout.world_size} ranks, ZeRO stage {p.zero_stage}, {recipe.precision}, "
        f"activation checkpointing {'on' if p.activation_checkpointing else 'off'}",
        f"model: {total / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, seq {recipe.seq_length}",
        f"batch: micro {p.micro_batch} x DP {layout.dp} x {gb // (p.micro_batch * layout.dp)} accumulation = "
        f"global {gb} samples ({gb * recipe.seq_length} tokens) per step"
        + (
            f" at first, ramping up to {p.global_batch} over {recipe.batch_rampup.ramp_samples} samples"
            if recipe.batch_rampup.enabled
            else ""
        ),
        "",
        f"{'stage':>5}  {'params/rank':>12}  {'weights':>9}  {'grads':>9}  {'optimizer':>9}  {'activations':>11}  "
        f"{'total':>9}  layers",
    ]
    for e in estimate(recipe, layout):
        lines.append(
            f"{e.stage:>5}  {e.params / 1e6:>11.2f}M  {e.weights_bytes / GIB:>7.3f}Gi  {e.grads_bytes / GIB:>7.3f}Gi  "
            f"{e.optimizer_bytes / GIB:>7.3f}Gi  {e.activation_bytes / GIB:>9.3f}Gi  {e.total_bytes / GIB:>7.3f}Gi  "
            f"{_layer_range(e.layers)}"
        )
    lines.append("(per rank; every TP and DP rank of a stage holds the same amount. Nothing was allocated.)")
    return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


__all__ = ["StageEstimate", "dry_run_report", "estimate", "pipeline_layer_params"]
