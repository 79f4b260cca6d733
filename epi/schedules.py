"""Learning-rate schedules, built from `conf/lr_scheduler/` with `_partial_: true`; the trainer adds the
optimizer and the run's total steps (known only once the strategy has planned its stages)."""

from __future__ import annotations

import math

import torch

DECAYS = ("cosine", "linear", "constant")


def warmup_decay(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, decay: str,
                 min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then cosine or linear decay to `min_lr_ratio` x lr at `total_steps`, or constant."""

    def factor(i: int) -> float:  # i counts finished steps: step i + 1 applies factor(i)
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (i - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, *, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The optimizer's lr at every step (CPI's probes)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
