"""`strategy=random`: EPI's schedule and budget with random selection.

The control that shows whether importance matters: the same fraction p is isolated and
refreshed on the same steps, but which coordinates is drawn uniformly at random.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epi.sharding import local
from epi.strategies.epi import EvolvingIsolation


class RandomIsolation(EvolvingIsolation):
    """EPI's budget and refresh schedule with coordinates drawn uniformly at random: the control for importance."""

    name = "random"  # the registry name: conf/strategy/random.yaml

    def importance(self) -> dict[str, Tensor]:
        """Uniform scores over the whole parameters (the same draws on every rank); under parallel=fsdp each rank
        keeps its shard's rows of them, so a sharded run isolates the unsharded run's coordinates."""
        scores = {}
        for n, p in self.params.items():
            drawn = torch.rand(p.shape, generator=self.generator)
            if self.ctx.shards is not None:
                start, size = self.ctx.shards.start[n], self.ctx.shards.size[n]
                drawn = drawn.reshape(-1)[start : start + size].view(local(p).shape)
            scores[n] = drawn.to(local(p).device)
        return scores

    def task_importance(self, task: str, step: int) -> dict[str, Tensor]:
        """Exclusive mode: each task's coordinates drawn at random, as many as EPI would give it."""
        return self.importance()
