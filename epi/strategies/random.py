"""`strategy=random`: EPI's schedule and budget with random selection.

The control that shows whether importance matters: the same fraction p is isolated and
refreshed on the same steps, but which coordinates is drawn uniformly at random.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epi.strategies.epi import EvolvingIsolation


class RandomIsolation(EvolvingIsolation):
    """EPI's budget and refresh schedule with coordinates drawn uniformly at random: the control for importance."""

    def importance(self) -> dict[str, Tensor]:
        return {n: torch.rand(p.shape, generator=self.generator).to(p.device) for n, p in self.params.items()}

    def task_importance(self, task: str, step: int) -> dict[str, Tensor]:
        """Exclusive mode: each task's coordinates drawn at random, as many as EPI would give it."""
        return self.importance()
