"""`TrainerContext`: the `Context` (epi.strategies.base) the trainer hands a strategy.

It holds the few components a strategy may use, privately, and offers them through the protocol's
methods; a strategy never reaches the trainer, its loop or its config through it. The services that train
or differentiate (`train_copy`, `task_gradient`) run on the run's `Stepper`, so a probe steps exactly as the run.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor

from epi import rundir
from epi.config import RunConfig
from epi.logging import RunLogger
from epi.masks import Masks
from epi.schedules import constant
from epi.sharding import local
from epi.step import Learner, Stepper

# Optimizer state entries the isolation engine can vouch for: kept for every coordinate (isolated ones
# included under isolated_moments=track), so a strategy may read them as importance.
TRACKED_STATE = {torch.optim.Adam: ("exp_avg", "exp_avg_sq"), torch.optim.AdamW: ("exp_avg", "exp_avg_sq")}


class TrainerContext:
    def __init__(self, *, cfg: RunConfig, stepper: Stepper, learner: Learner, logger: RunLogger, run_dir: Path,
                 tasks: tuple[str, ...]):
        engine = learner.optimizer
        self.named_params = engine.named_params
        self.shards = engine.shards  # parallel=fsdp: the local shards' places; None otherwise
        self.tasks, self.seed, self.rank, self.steps = tasks, cfg.seed, stepper.rank, cfg.schedule.steps
        self._cfg, self._stepper, self._learner = cfg, stepper, learner
        self._model, self._engine, self._logger, self._run_dir, self._world = learner.model, engine, logger, run_dir, stepper.world

    def charge(self, optimizer_steps: int, trained_tokens: int) -> None:
        """Compute the run consumed without spending it here (a probe read from the cache)."""
        self._stepper.charge(optimizer_steps, trained_tokens)

    def optimizer_state(self, name: str) -> dict[str, Any]:
        return self._engine.optimizer.state.get(self.named_params[name], {})

    def optimizer_keeps(self, key: str) -> bool:
        kept = next((keys for cls, keys in TRACKED_STATE.items() if isinstance(self._engine.optimizer, cls)), ())
        return key in kept and self._engine.moments == "track"

    def masks(self) -> Masks:
        return self._engine.masks

    def set_masks(self, masks: Masks) -> dict[str, int]:
        return self._engine.set_masks(masks)

    def exclusive_index(self) -> dict[str, dict[str, Tensor]]:
        return self._engine.owned

    def owner_counts(self) -> dict[str, dict[frozenset[str], int]]:
        return self._engine.owner_counts

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

    # ---------------------------------------------------------------- training services, on the run's stepper
    def train_copy(self, task: str, steps: int, lr: float) -> tuple[dict[str, Tensor], int, float]:
        """A copy of the model trained on `task` alone with `train_step` (no weight decay, constant lr):
        its weights, the trained tokens it consumed (counted in the run's compute too) and its last loss.

        Under parallel=fsdp no rank can hold a whole copy: the run's own sharded model trains with a fresh
        optimizer and sampler, its tuned shards (this rank's, by parameter name) are returned, and its
        weights are put back bit for bit."""
        if self.shards is not None:
            theta0 = {n: local(p).detach().clone() for n, p in self.named_params.items()}
            try:
                return self._train(self._model, task, steps, lr, lambda: {n: local(p).detach().cpu().clone() for n, p in self.named_params.items()})
            finally:
                with torch.no_grad():
                    for n, p in self.named_params.items():
                        local(p).copy_(theta0[n])
        model = copy.deepcopy(self._model)
        return self._train(model, task, steps, lr, lambda: {n: t.detach().cpu().clone() for n, t in model.state_dict().items()})

    def _train(self, model: torch.nn.Module, task: str, steps: int, lr: float,
               weights: Callable[[], dict[str, Tensor]]) -> tuple[dict[str, Tensor], int, float]:
        learner = self._stepper.new_learner(f"a copy trained on {task!r}", model, {task: 1.0}, lr=lr, weight_decay=0.0)
        learner.scheduler = constant(learner.optimizer.optimizer, total_steps=steps)
        learner.horizon = steps
        tokens = 0
        for step in range(1, steps + 1):
            out = self._stepper.train_step(step, learner)
            tokens += out.trained_tokens
        return weights(), tokens, out.loss

    def task_gradient(self, task: str, step: int, draw: int = 0) -> dict[str, Tensor]:
        """The gradient of the loss on a calibration batch of `task` alone at the run's current weights, with no
        update: batch_size examples drawn by `default_rng([seed, 3, step, task index, draw])` (a pure function,
        so a resume draws the same), token-weighted and sharded like a training step. Its tokens are charged."""
        learner, s, stepper = self._learner, self._cfg.schedule, self._stepper
        if any(p.grad is not None for p in learner.named_params.values()):
            raise RuntimeError("task_gradient needs the gradients cleared: call it from after_step")
        rows = stepper.train_sets[task]
        rng = np.random.default_rng([self.seed, 3, step, sorted(stepper.train_sets).index(task), draw])
        picks = [int(i) for i in rng.choice(len(rows), size=min(s.batch_size, len(rows)), replace=False)]
        trained = sum(stepper.trained_counts[task][i] for i in picks)
        stepper.charge(0, trained)
        with torch.enable_grad():  # strategies call this from their no-grad refresh
            stepper.backward(learner, stepper.shard([rows[i] for i in picks]), trained)
        # the gradients themselves, not copies: zero_grad(set_to_none) only drops the parameters' references to them
        grads = {n: torch.zeros_like(local(p)) if p.grad is None else local(p.grad).detach()  # local shards under fsdp
                 for n, p in learner.named_params.items()}
        learner.optimizer.zero_grad(set_to_none=True)
        return grads

    def fingerprint(self, task: str) -> str:
        """A content key of what `train_copy(task, ...)` depends on besides its arguments."""
        h = hashlib.sha256()
        h.update(json.dumps(OmegaConf.to_container(self._cfg.composed.model, resolve=True), sort_keys=True).encode())
        weights = self._model.state_dict() if self.shards is None else {n: local(p) for n, p in self.named_params.items()}
        for name, tensor in weights.items():  # theta0 itself (this rank's shards under fsdp), not just how it was made
            h.update(name.encode())
            h.update(tensor.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
            h.update(str(float(tensor.float().sum())).encode())
        if self.shards is not None:  # one key on every rank, for the set of shards: each rank's digest, in rank order
            digests = [None] * self._world
            dist.all_gather_object(digests, h.hexdigest())
            h = hashlib.sha256(repr(("fsdp", self._world, digests)).encode())
        for row in self._stepper.train_sets[task]:
            h.update(bytes(str(row["input_ids"]), "utf-8"))
        s = self._cfg.schedule
        optimizer = OmegaConf.to_container(self._cfg.composed.optimizer, resolve=True)
        settings = (s.batch_size, s.grad_accum, s.group_by_length, s.precision, s.lm_head, s.clip_norm, self.seed, optimizer)
        h.update(repr(settings + (("packing",) if self._cfg.data.packing else ())).encode())  # unpacked: the keys as before
        return h.hexdigest()
