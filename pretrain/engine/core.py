"""One optimizer step at any TP x PP x DP layout: ``TrainEngine.train_batch(micro_batches, global_batch, lr)``.

The model is the plain ``KilnLlama``, built on the meta device and split for this rank by
``kiln.parallel.parallelize`` (TP slices, pipeline stage, activation checkpointing, local init).

* PP = 1: ``KilnLlama`` itself (megatron TP layers at TP > 1, plain layers at TP = 1) in a DeepSpeed engine
  with ZeRO 0-3 over the data-parallel group; ``kiln.parallel.topology.MegatronMPU`` tells DeepSpeed the groups.
  The loop runs the micro-batches (forward, ``engine.backward``, ``engine.step`` which only updates at the
  gradient-accumulation boundary).
* PP > 1: the pipeline stages of ``kiln.parallel.pipeline`` (cut out of the same model) in DeepSpeed's 1F1B
  ``PipelineEngine`` (ZeRO 0/1), which pulls the micro-batches from an iterator on the first and last stage.

Either way the step's loss is the mean of the micro-batch losses of the whole global batch, on every rank.

A single replica (DP = 1, PP = 1, fp32) runs ZeRO 0 whatever stage the recipe asks for, without DeepSpeed's
(1-rank) backward all-reduce, and clips the gradients here so that ``grad_norm`` is reported
(``kiln.pretrain.engine.zero.effective_zero_stage``).

NaN/inf loss (``NanGuard`` counts it, marks the step skipped, stops after ``max_nan_steps``):

* PP = 1: the step's loss is reduced over DP before the last micro-batch's ``engine.step()`` (the
  accumulation boundary); a non-finite one skips the update on every rank alike (``_skip_update``: the
  gradients are dropped where DeepSpeed keeps them at ZeRO 0/1/2/3, the weights and AdamW state are untouched,
  DeepSpeed's micro/global step counters advance as for its own overflow skip). ``metrics["skip"]`` is set.
* PP > 1: DeepSpeed's ``PipelineEngine.train_batch`` runs forward, backward and the optimizer step in one
  call, so the decision is taken inside it: the schedule's ``OptimizerStep`` instruction (the last one, on
  every stage) first all-reduces a "non-finite loss" flag over the job (MAX; the last stage holds the summed
  micro-batch losses by then) and, if set, skips the update on every rank alike, as DeepSpeed skips an
  overflowed step: gradients dropped (module ``.grad`` at ZeRO 0, ZeRO 1's flat partitions, bf16's fp32
  buffers), weights and AdamW state untouched, DeepSpeed's step/sample counters advanced
  (``kiln.pretrain.engine.deepspeed_adapter.install_pipeline_nonfinite_skip``). The loss returned is the non-finite one; ``metrics["skip"]`` is set.

Checkpoints are not written once NanGuard stops the run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from kiln.parallel import parallelize
from kiln.parallel.pipeline import model_param_name
from kiln.parallel.tensor_parallel import tp_split_dim
from kiln.parallel.topology import ParallelContext
from kiln.pretrain.engine import deepspeed_adapter
from kiln.pretrain.engine.batches import trainable_tokens
from kiln.pretrain.engine.zero import deepspeed_config, effective_zero_stage, single_replica, weight_decay_groups
from kiln.pretrain.model import KilnLlama, positions_from_segments
from kiln.pretrain.recipe import TrainRecipe
from kiln.pretrain.train_module import TrainModule


class TrainEngine(TrainModule):
    """The DeepSpeed train module: model (TP/PP as the layout says), ZeRO optimizer, step, checkpoints."""

    def __init__(self, recipe: TrainRecipe, ctx: ParallelContext):
        deepspeed_adapter.check_deepspeed_version()  # before anything reads DeepSpeed's internals
        import deepspeed

        self._own_grad_norm: float | None = None
        self.recipe, self.ctx, self.cfg = recipe, ctx, recipe.model
        self.pipelined = ctx.layout.pp > 1
        self.global_batch = recipe.global_batch_at(0)
        ds_config = deepspeed_config(recipe, ctx.layout, self.global_batch)
        self.zero_stage = effective_zero_stage(recipe, ctx.layout)
        # one replica (DP = 1, PP = 1, fp32): ZeRO 0, no backward all-reduce (over one rank), our own clipping
        self.single_replica = single_replica(recipe, ctx.layout)
        # The plain model on the meta device (nothing allocated), then this rank's part of it: TP slices, the
        # pipeline stage, activation checkpointing, and only the local parameters materialised and initialised.
        model = KilnLlama(self.cfg, device="meta")
        self.module = parallelize(model, ctx, recipe.parallel, init_seed=recipe.seed)
        if not self.pipelined and self.zero_stage == 3 and self.cfg.tie_word_embeddings:
            # ZeRO-3 gathers a parameter for the module that owns it; the tied head reads the embedding's weight
            # from another module, which must be declared.
            deepspeed.zero.register_external_parameter(self.module, self.module.embed_tokens.weight)
        groups = weight_decay_groups(self.module.named_parameters(), recipe.optimizer.weight_decay)
        # DeepSpeed's PipelineEngine takes its groups from the PipelineModule's topology, the plain engine from
        # the megatron groups (mpu)
        mpu = None if self.pipelined else ctx.mpu
        self.engine, *_ = deepspeed.initialize(model=self.module, model_parameters=groups, config=ds_config, mpu=mpu)
        if self.single_replica:
            self.engine.enable_backward_allreduce = False

    # --- one step ---

    def train_batch(self, micro_batches: list[dict[str, torch.Tensor]], global_batch: int, lr: float) -> dict:
        """Run this rank's micro-batches of one global batch and the optimizer step. Returns ``loss`` (the mean
        over all micro-batches of the global batch, the same on every rank) and ``grad_norm`` (before clipping;
        NaN for a skipped step) as 0-dim tensors left on the device (the trainer reads them at log steps), ``lr``
        and ``skip`` (host bool: the update was skipped for a non-finite loss)."""
        if global_batch != self.global_batch:  # batch-size ramp-up: more micro-batches per step
            self.engine.set_train_batch_size(global_batch)
            self.global_batch = global_batch
        expected = self.engine.gradient_accumulation_steps()
        if len(micro_batches) != expected:
            raise ValueError(f"got {len(micro_batches)} micro-batches, the engine expects {expected}")
        self.set_lr(lr)
        self._own_grad_norm = None
        if self.pipelined:
            loss, skipped = self._pipeline_step(micro_batches)
        else:
            loss, skipped = self._plain_step(micro_batches)
        if skipped:
            grad_norm = float("nan")
        elif self._own_grad_norm is not None:
            grad_norm = self._own_grad_norm
        else:
            grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = float("nan")
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skip": skipped}

    def save_checkpoint(self, manager, state) -> Path:
        from kiln.pretrain.checkpointing import save_train_checkpoint

        return save_train_checkpoint(manager, self.recipe, self, state, self.ctx)

    def load_checkpoint(self, path: Path, state) -> dict:
        from kiln.pretrain.checkpointing import restore_checkpoint

        return restore_checkpoint(path, self, state, self.ctx)

    def finish_checkpoints(self, manager) -> None:
        from kiln.pretrain.checkpointing import wait_for_checkpoint

        wait_for_checkpoint(manager, self.ctx)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def current_lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def _plain_step(self, micro_batches) -> tuple[torch.Tensor, bool]:
        """Forward/backward every micro-batch; the step's loss (mean over the global batch, reduced over DP
        before the last ``engine.step()``) decides the update: a non-finite one skips it (``_skip_update``), on
        every rank alike. Returns (loss as a device tensor, skipped).

        The loss is summed on the device; reading whether it is finite is this step's one host sync, and it
        cannot be avoided: whether to call the optimizer is a host decision (Megatron's ``found_inf.item()``
        and DeepSpeed's fp16 overflow check are the same sync)."""
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        last = len(micro_batches) - 1
        scale = self._token_scale(micro_batches)
        for i, mb in enumerate(micro_batches):
            mb = self._to_device(mb)
            segment_ids = mb.get("segment_ids") if self.cfg.document_masking else None
            loss = self.engine(
                mb["input_ids"],
                position_ids=mb.get("position_ids"),
                segment_ids=segment_ids,
                labels=mb["labels"],
                loss_mask=mb.get("loss_mask"),
                reduction="mean" if scale is None else "sum",
            )
            if scale is not None:
                loss = loss * scale
            self.engine.backward(loss)
            total += loss.detach().double()
            if i < last:
                self.engine.step()  # not the accumulation boundary: only DeepSpeed's micro-step counter
        total /= len(micro_batches)
        if self.ctx.layout.dp > 1:
            dist.all_reduce(total, group=self.ctx.dp_group)
            total /= self.ctx.layout.dp
        if bool(torch.isfinite(total)):
            if self.single_replica:
                self._own_grad_norm = self._clip_gradients()
            self.engine.step()
            return total, False
        self._skip_update()
        return total, True

    def _token_scale(self, micro_batches) -> torch.Tensor | None:
        """``loss_normalization: global_tokens``: the factor that turns a micro-batch's summed loss into its share
        of (sum over every trainable token of the step) / (their count over all DP ranks). DeepSpeed divides each
        micro-batch's loss by the accumulation steps and averages gradients over DP, so the factor is
        ``gas * dp / N``; the mean the loop reports (over micro-batches, then DP) is then exactly sum / N. The
        count comes from the host copies of the masks (no device sync) and is all-reduced over DP on the device.
        None for ``micro_batch_mean``."""
        if self.recipe.loss_normalization != "global_tokens":
            return None
        count = sum(float(trainable_tokens(mb).sum()) for mb in micro_batches)
        total = torch.tensor(count, dtype=torch.float64, device=self.ctx.device)
        dp = self.ctx.layout.dp
        if dp > 1:
            dist.all_reduce(total, group=self.ctx.dp_group)
        return (len(micro_batches) * dp / total.clamp(min=1.0)).float()

    @torch.no_grad()
    def _clip_gradients(self) -> torch.Tensor:
        """A single replica's global gradient-norm clip (DeepSpeed's is off there): the norm over every TP shard
        (TP-split parameters on every TP rank, replicated ones on TP rank 0 only, summed over the TP group),
        then ``torch.nn.utils.clip_grad_norm_``'s rule. Returns the norm before clipping."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.ctx.device)
        tp = self.ctx.layout.tp
        counted = [
            p.grad for p in params if tp == 1 or getattr(p, "tensor_model_parallel", False) or self.ctx.tp_rank == 0
        ]
        norms = torch._foreach_norm(counted) if counted else [torch.zeros((), device=self.ctx.device)]
        total = torch.linalg.vector_norm(torch.stack(norms))
        if tp > 1:
            squares = total.double().pow(2)
            dist.all_reduce(squares, group=self.ctx.tp_group)
            total = squares.sqrt().float()
        max_norm = self.recipe.optimizer.clip_grad
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in params], coef)
        return total

    def _skip_update(self) -> None:
        """The accumulation boundary without the optimizer update (``deepspeed_adapter.skip_update``)."""
        deepspeed_adapter.skip_update(self.engine, self.module)

    def _pipeline_step(self, micro_batches) -> tuple[torch.Tensor, bool]:
        """DeepSpeed's 1F1B schedule over the micro-batches, whose ``OptimizerStep`` skips the update on every
        rank when a last-stage loss is not finite (``deepspeed_adapter.install_pipeline_nonfinite_skip``, installed on the
        first step). Returns (loss: the mean over the global batch, the same on every rank; skipped)."""
        record = getattr(self, "_pipeline_skip", None)
        if record is None:
            from kiln.pretrain.engine.deepspeed_adapter import install_pipeline_nonfinite_skip

            record = self._pipeline_skip = install_pipeline_nonfinite_skip(self.engine)
        record.skipped = False
        self.module.loss_fn.scale = self._token_scale(micro_batches)  # None: each micro-batch's token mean
        items = [self.pipeline_inputs(mb) for mb in micro_batches]
        loss = self.engine.train_batch(data_iter=iter(items))
        return loss.detach(), record.skipped

    def pipeline_inputs(self, mb: dict[str, torch.Tensor]) -> tuple[tuple, tuple]:
        """A micro-batch as DeepSpeed's pipeline takes it: ``((input_ids, position_ids[, segment_ids]),
        (labels, loss_mask))`` (the first stage reads the inputs, the last the targets)."""
        mb = self._to_device(mb)
        input_ids = mb["input_ids"]
        segment_ids = mb.get("segment_ids") if self.cfg.document_masking else None
        position_ids = mb.get("position_ids")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            else:
                b, s = input_ids.shape
                position_ids = torch.arange(s, device=input_ids.device).expand(b, s).contiguous()
        inputs = (input_ids, position_ids) if segment_ids is None else (input_ids, position_ids, segment_ids)
        loss_mask = mb.get("loss_mask")
        if loss_mask is None:
            loss_mask = torch.ones_like(mb["labels"], dtype=torch.float32)
        return inputs, (mb["labels"], loss_mask.float())

    def _to_device(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in mb.items()}

    @torch.no_grad()
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model as full-size fp32 CPU tensors under KilnLlama (= Hugging Face) names, on every rank,
        whatever the layout: ZeRO-3 partitions are gathered over DP, TP slices concatenated over the TP group,
        pipeline stages exchanged over the PP group. All ranks must call it. Memory: every rank ends up holding
        the whole model once, in fp32 (with bf16 training these are the bf16 weights, not the fp32 masters)."""
        import deepspeed

        n_layers, tp = self.cfg.num_hidden_layers, self.ctx.layout.tp
        named = list(self.module.named_parameters())
        local: dict[str, torch.Tensor] = {}
        with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=self.zero_stage == 3):
            for name, p in named:
                name = model_param_name(name, n_layers) if self.pipelined else name
                if name in local:  # the tied embedding's second copy on the last stage
                    continue
                value = p.detach()
                dim = tp_split_dim(name)
                if tp > 1 and dim is not None:
                    parts = [torch.empty_like(value) for _ in range(tp)]
                    dist.all_gather(parts, value.contiguous(), group=self.ctx.tp_group)
                    value = torch.cat(parts, dim=dim)
                local[name] = value.float().cpu().clone()
        if self.ctx.layout.pp == 1:
            return local
        stages: list[dict[str, torch.Tensor]] = [{} for _ in range(self.ctx.layout.pp)]
        dist.all_gather_object(stages, local, group=self.ctx.pp_group)
        return {name: t for stage in stages for name, t in stage.items()}

    def full_optimizer_state(self) -> dict:
        """The full AdamW state (moments, fp32 masters, step) per KilnLlama parameter name, gathered from every
        ZeRO / TP / PP shard, on every rank (``kiln.pretrain.engine.state``). All ranks must call it."""
        from kiln.pretrain.engine.state import full_optimizer_state

        return full_optimizer_state(self)

    def load_full_state(self, model_state: dict[str, torch.Tensor], optimizer_state: dict | None = None) -> None:
        """Load a full (any-layout) model state, and optimizer state when given, into this rank's shards."""
        from kiln.pretrain.engine.state import load_full_state

        load_full_state(self, model_state, optimizer_state)

    def num_parameters(self) -> int:
        """Parameters held by this rank (its TP slice of its pipeline stage), counted before ZeRO sharding."""
        return sum(deepspeed_adapter.local_numel(p) for p in self.module.parameters())


__all__ = ["TrainEngine"]
