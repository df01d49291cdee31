"""Learning-rate schedules as pure functions of the optimizer step (so resume needs no scheduler state).

``lr_at(step)`` is the rate used by optimizer step ``step`` (0-based): linear warm-up from ``lr / warmup`` to
``lr`` over ``warmup_steps``, then

* ``cosine``: half-cosine from ``lr`` to ``min_lr_ratio * lr`` at ``decay_steps`` (default: the last step),
  constant after (MT-NLG: cosine to 10%);
* ``wsd``: warmup-stable-decay, constant ``lr`` until the last ``wsd_decay_fraction`` of training, then linear
  to ``min_lr_ratio * lr`` at the last step;
* ``constant``: ``lr`` after warm-up.
"""

from __future__ import annotations

import math

from kiln.pretrain.recipe import ScheduleConfig


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, lr: float, train_steps: int):
        self.cfg, self.lr, self.train_steps = cfg, lr, train_steps
        self.min_lr = cfg.min_lr_ratio * lr
        self.decay_end = cfg.decay_steps if cfg.decay_steps is not None else train_steps

    def __call__(self, step: int) -> float:
        return self.lr_at(step)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return self.lr * (step + 1) / cfg.warmup_steps
        if cfg.kind == "constant":
            return self.lr
        if cfg.kind == "cosine":
            span = max(1, self.decay_end - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        # wsd
        decay_steps = max(1, round(cfg.wsd_decay_fraction * self.train_steps))
        decay_start = self.train_steps - decay_steps
        if step < decay_start:
            return self.lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return self.lr + (self.min_lr - self.lr) * progress


__all__ = ["LRSchedule"]
