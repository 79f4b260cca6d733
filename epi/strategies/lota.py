"""`strategy=lota`: Lottery Ticket Adaptation and, over stages, LoTTO (Panda et al. 2024, arXiv 2406.16797; code
kiddyboots216/lottery-ticket-adaptation).

At the start of every stage, from the run's current weights theta0:
1. calibrate  fine-tune a copy on each of the stage's tasks for `calibration_steps` (`Context.train_copy`: the
              trainer's own step, no weight decay, constant `calibration_lr`; its tokens and steps are charged to
              the run's compute); the task vector is delta = theta_T - theta0
2. extract    the mask keeps the top (1 - `sparsity`) fraction of the participating entries by |delta| (one
              ranking over all of them by default, as the authors' `get_global_sparsity_masks`)
3. adapt      the run trains from theta0 (the copy is never loaded: `train_copy` leaves the run's model as it
              was) with every entry outside the mask frozen through the isolation engine
With `disjoint` (LoTTO), a later stage's mask is drawn from the entries no earlier stage's mask took, so the
stages' sparse updates never overlap (the authors' `get_constrained_mask`).

What the authors' code fixes, and this module follows: the ranking is global over the MLP and attention weight
matrices; every other parameter (embeddings, LM head, norms, biases) is frozen (`only_update_prune=True`);
the default sparsity of the adapted model is 90% (`sparsity_ratio="0.9"` in scripts/continual_learning.sh).
Masked training there zeroes the masked gradients before clipping; the isolation engine likewise leaves frozen
coordinates out of the clip norm and holds their values under weight decay.

Choices the paper leaves open, as keys: a stage with several tasks (the paper calibrates on one task) takes the
weighted mean of its tasks' task vectors (`multi_task: mean`, what one calibration on the mixture gives to first
order) or the union of each task's own mask (`union`); `count_calibration_in_budget` takes the calibration steps
out of each stage's steps (equal compute with a run that does not calibrate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from epi.errors import TrainingDiverged, UserError
from epi.masks import SCOPES, Masks, NonFiniteScores, mask_stats, pack, top_p, union, unpack
from epi.schema import Schema, at_least, positive, within
from epi.strategies.base import Context, Stage, Strategy, participating_params

MULTI_TASK = ("mean", "union")


def task_vector(base: dict[str, Tensor], tuned: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """delta = theta_T - theta0 of the named parameters, in float32."""
    return {n: tuned[n].float() - base[n].float() for n in names}


def lottery_ticket(delta: dict[str, Tensor], keep: float, scope: str, taken: Masks) -> Masks:
    """The entries to train: the top `keep` fraction by |delta| among those `taken` does not hold (True = trained).

    Taken entries score -1 (every |delta| is >= 0), so they rank last and the ticket is drawn from the rest; they
    are removed afterwards in case the rest is smaller than the budget."""
    scores = {}
    for name, d in delta.items():
        score = d.abs()
        if name in taken:
            score = score.masked_fill(taken[name].to(score.device), -1.0)
        scores[name] = score
    ticket = top_p(scores, keep, scope=scope, method="exact")
    return {n: m & ~taken[n].to(m.device) if n in taken else m for n, m in ticket.items()}


@dataclass
class LoTAConfig(Schema):
    """LoTA's keys; defaults: conf/strategy/lota.yaml."""

    sparsity: Annotated[float, within(0, 1, open_high=True, why="the fraction of the participating entries held fixed (0.9 = train 10%)")]
    calibration_steps: Annotated[int, at_least(1)]
    calibration_lr: Annotated[float, positive("e.g. 1e-3")]
    scope: Literal[SCOPES]
    include: dict[str, bool]
    disjoint: bool
    multi_task: Literal[MULTI_TASK]
    count_calibration_in_budget: bool


class LoTA(Strategy):
    """Lottery Ticket Adaptation: calibrate per stage, train only the top entries of the task vector, disjoint across stages (Panda et al. 2024, arXiv 2406.16797)."""

    name = "lota"  # the registry name: conf/strategy/lota.yaml
    Config = LoTAConfig

    def __init__(self, cfg: LoTAConfig):
        super().__init__(cfg)
        self.tickets: list[Masks] = []  # per calibrated stage, in order: the entries it trains (True = trained)

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        self.params = participating_params(ctx.named_params, self.cfg.include)
        self.numels = {n: p.numel() for n, p in ctx.named_params.items()}
        return [self._budgeted(stage) for stage in stages] if self.cfg.count_calibration_in_budget else stages

    def _budgeted(self, stage: Stage) -> Stage:
        """The stage less its calibration steps (`count_calibration_in_budget`: equal compute)."""
        cost = self.cfg.calibration_steps * len(stage.tasks)
        if stage.steps - cost < 1:
            raise UserError(
                f"strategy.count_calibration_in_budget=true: stage {stage.name!r} has {stage.steps} steps and its "
                f"{len(stage.tasks)} calibration(s) of strategy.calibration_steps={self.cfg.calibration_steps} take all of "
                "them; raise the stage's steps or lower strategy.calibration_steps"
            )
        return dataclasses.replace(stage, steps=stage.steps - cost)

    @property
    def taken(self) -> Masks:
        """The entries earlier stages' tickets train: LoTTO keeps later tickets off them."""
        return union(*self.tickets) if self.tickets else {}

    def on_stage_start(self, index: int, stage: Stage, step: int) -> None:
        """Calibrate on the stage's tasks from the current weights, extract its ticket, freeze everything else."""
        if index < len(self.tickets):  # calibrated before a resume: the engine's restored masks already hold it
            return
        base = self.ctx.model_state()
        names = list(self.params)
        deltas = {task: task_vector(base, self._calibrate(task, step), names) for task in stage.tasks}
        taken = self.taken if self.cfg.disjoint else {}
        try:
            if self.cfg.multi_task == "union":
                ticket = union(*(lottery_ticket(d, 1 - self.cfg.sparsity, self.cfg.scope, taken) for d in deltas.values()))
            else:
                ticket = lottery_ticket(self._mean(deltas, stage), 1 - self.cfg.sparsity, self.cfg.scope, taken)
        except NonFiniteScores as e:
            raise TrainingDiverged(f"lota: a calibration diverged (its task vector {e}); lower strategy.calibration_lr "
                                   f"(now {self.cfg.calibration_lr:g})") from e
        ticket = {n: m.cpu() for n, m in ticket.items()}
        self.tickets.append(ticket)
        self.ctx.set_masks(self.frozen(ticket))
        trained = mask_stats(ticket, self.numels)["isolated_fraction"]
        self.ctx.log(step, "mask", {"trained_fraction": trained, "isolated_fraction": 1 - trained, "stage": index})
        self.ctx.info(f"lota: stage {stage.name!r} trains {trained:.2%} of the parameters")

    def _calibrate(self, task: str, step: int) -> dict[str, Tensor]:
        """theta_T: a copy of the current model fine-tuned on `task` alone (charged to the run's compute)."""
        try:
            tuned, _, final_loss = self.ctx.train_copy(task, self.cfg.calibration_steps, self.cfg.calibration_lr)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"lota: the calibration on {task!r} diverged ({e}); lower strategy.calibration_lr "
                                   f"(now {self.cfg.calibration_lr:g}) or strategy.calibration_steps") from e
        self.ctx.log(step, "lota", {"calibration_final_loss": final_loss}, task=task)
        return tuned

    @staticmethod
    def _mean(deltas: dict[str, dict[str, Tensor]], stage: Stage) -> dict[str, Tensor]:
        """The stage's task vector: its tasks' task vectors weighted by the stage's task weights (one task: itself)."""
        if len(deltas) == 1:
            return next(iter(deltas.values()))
        weights = {task: stage.weights.get(task, 1.0) for task in deltas}
        total = sum(weights.values())
        names = next(iter(deltas.values()))
        return {n: sum(deltas[t][n] * (w / total) for t, w in weights.items()) for n in names}

    def frozen(self, ticket: Masks) -> Masks:
        """The engine's masks (True = frozen): every entry outside the ticket, non-participating parameters whole."""
        return {n: ~ticket[n] if n in ticket else torch.ones(p.shape, dtype=torch.bool) for n, p in self.ctx.named_params.items()}

    def state_dict(self) -> dict[str, Any]:
        """The tickets of the stages calibrated so far: which stage is calibrated, and what LoTTO must avoid next."""
        return {"tickets": [pack(ticket) for ticket in self.tickets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tickets = [unpack(packed) for packed in state["tickets"]]
