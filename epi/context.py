"""`TrainerContext`: the `Context` (epi.strategies.base) the trainer hands a strategy.

It holds the few components a strategy may use, privately, and offers them through the protocol's
methods; a strategy never reaches the trainer, its loop or its config through it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from epi import rundir
from epi.logging import RunLogger
from epi.masks import Masks
from epi.optim import IsolatedOptimizer
from epi.sharding import local

# Optimizer state entries the isolation engine can vouch for: kept for every coordinate (isolated ones
# included under isolated_moments=track), so a strategy may read them as importance.
TRACKED_STATE = {torch.optim.Adam: ("exp_avg", "exp_avg_sq"), torch.optim.AdamW: ("exp_avg", "exp_avg_sq")}


class TrainerContext:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        engine: IsolatedOptimizer,
        logger: RunLogger,
        run_dir: Path,
        tasks: tuple[str, ...],
        seed: int,
        rank: int,
        world: int,
        steps: int,
        train_copy: Callable[[str, int, float], tuple[dict[str, Tensor], int, float]],
        fingerprint: Callable[[str], str],
        charge: Callable[[int, int], None],
        task_gradient: Callable[[str, int, int], dict[str, Tensor]],
    ):
        self.named_params = engine.named_params
        self.shards = engine.shards  # parallel=fsdp: the local shards' places; None otherwise
        self.tasks, self.seed, self.rank, self.steps = tasks, seed, rank, steps
        self.train_copy, self.fingerprint, self.charge, self.task_gradient = train_copy, fingerprint, charge, task_gradient
        self._model, self._engine, self._logger, self._run_dir, self._world = model, engine, logger, run_dir, world

    def optimizer_state(self, name: str) -> dict[str, Any]:
        return self._engine.optimizer.state.get(self.named_params[name], {})

    def optimizer_keeps(self, key: str) -> bool:
        kept = next((keys for cls, keys in TRACKED_STATE.items() if isinstance(self._engine.optimizer, cls)), ())
        return key in kept and self._engine.moments == "track"

    def masks(self) -> Masks:
        return self._engine.masks

    def set_masks(self, masks: Masks) -> dict[str, int]:
        return self._engine.set_masks(masks)

    def exclusive_masks(self) -> dict[str, Masks]:
        return self._engine.exclusive_masks

    def set_exclusive(self, masks: dict[str, Masks]) -> dict[str, int]:
        return self._engine.set_exclusive(masks)

    def mean_across_ranks(self, tensors: list[Tensor]) -> None:
        if self.shards is not None:
            raise RuntimeError("mean_across_ranks under parallel=fsdp would average different shards; rank through ctx.shards")
        if self._world > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.AVG)

    def log(self, step: int, split: str, metrics: dict[str, float], task: str | None = None) -> None:
        self._logger.log(step, split, metrics, task=task)

    def info(self, message: str) -> None:
        if self.rank == 0:
            print(message)

    def artifact(self, name: str, data: dict[str, Any], *, table: tuple[list[str], list[list[Any]]] | None = None,
                 heatmap: tuple[list[str], list[list[float]]] | None = None) -> None:
        """The reporter's job: JSON in the run directory, the table and heatmap to W&B (rank 0 only)."""
        if self.rank != 0:
            return
        path = self._run_dir / rundir.artifact(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        if table is not None:
            self._logger.table(name, *table)
        if heatmap is not None:
            from epi.plots import plot_overlap  # matplotlib only when a strategy draws

            self._logger.image(f"{name}_heatmap", plot_overlap(*heatmap, path.with_suffix(".png")))

    def model_state(self) -> dict[str, Tensor]:
        """The weights on CPU; under parallel=fsdp this rank's shards of the trainable parameters, by name."""
        if self.shards is not None:
            return {n: local(p).detach().cpu().clone() for n, p in self.named_params.items()}
        return {n: t.detach().cpu().clone() for n, t in self._model.state_dict().items()}

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        """Weights as `model_state` gives them (this rank's shards under parallel=fsdp)."""
        if self.shards is not None:
            with torch.no_grad():
                for n, p in self.named_params.items():
                    local(p).copy_(state[n])
            return
        self._model.load_state_dict(state)
