"""How a run is spread over processes, as plain data: the ``parallel`` section of a recipe (``ParallelConfig``)
and the TP x PP x DP ``Layout`` it resolves to for a world size (``kiln.pretrain.recipe.TrainRecipe.layout``).

No torch here: the recipe loader, ``--dry-run`` and the CLI import this before any process group (or torch)
exists, and a test checks that loading a recipe imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Tensor x pipeline x data parallelism, ZeRO, batch sizes (in samples of ``data.seq_length`` tokens)."""

    tp: int = 1  # tensor-parallel size: ranks splitting each layer's matrices (keep inside a node)
    pp: int = 1  # pipeline-parallel size: stages of consecutive layers (1F1B schedule)
    dp: int = -1  # -1: derived as world_size // (tp * pp)
    zero_stage: int = 1  # DeepSpeed ZeRO: 1 shards optimizer state over DP, 2 also gradients, 3 also weights
    micro_batch: int = 1  # samples per micro-batch per data-parallel rank
    global_batch: int = 8  # samples per optimizer step, over all data-parallel ranks
    # recompute each decoder layer in the backward pass instead of keeping its activations
    activation_checkpointing: bool = False
    collective_timeout_s: float = 600.0  # a collective that waits longer ends the job instead of hanging it

    def validate(self) -> None:
        for name in ("tp", "pp", "micro_batch", "global_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dp != -1 and self.dp < 1:
            raise ValueError(f"dp must be >= 1 or -1 (derived from the world size), got {self.dp}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage >= 2 and self.pp > 1:
            raise ValueError(
                f"zero_stage={self.zero_stage} cannot be combined with pipeline parallelism "
                f"(pp={self.pp}): DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"
            )
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")


@dataclass(frozen=True)
class Layout:
    """The resolved TP x PP x DP sizes of one run (their product is the world size)."""

    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"TP{self.tp} x PP{self.pp} x DP{self.dp}"


__all__ = ["Layout", "ParallelConfig"]
