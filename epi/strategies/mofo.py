"""`strategy=mofo`: the momentum-filtered optimizer (Chen et al. 2024, arXiv 2407.20999; code YChen-zzz/MoFO).

Every step Adam's moments take the whole clipped gradient, exactly as plain AdamW's do; then, within each
filtered parameter tensor, only the entries whose updated first moment |m_t| is among the largest fraction
`alpha` keep their update. Every other entry keeps the value it had before the step, bit for bit, weight
decay included. Parameters outside the filter (norms and biases, as in the authors' `AdamW_MoFO`) update
fully every step.

What the authors' code (`algorithms_MoFO.AdamW_MoFO`) fixes, and this module follows:
- the criterion is |m_t|, this step's first moment after its update with this step's gradient, neither
  bias-corrected nor divided by sqrt(v_t) (bias correction is one scalar per tensor: it changes no ranking);
- the partition is the parameter tensor: k = floor(alpha * numel) per tensor (at least 1 here, where the
  authors' topk would fail on k = 0), and the entries with |m_t| >= the k-th largest |m_t| move (ties at the
  threshold all move, as there, except entries whose m_t is 0: see `momentum_filter`);
- norms and biases are not filtered; embeddings and the LM head are (`include`);
- the gradient clipped is the whole gradient (open-instruct clips all parameters before the step).

Why after the step and not through the isolation engine: the engine's masks must be set before the step,
when m_t does not exist yet, and it leaves held coordinates out of the clip norm, which MoFO does not. Here
nothing is masked, so the optimizer clips and updates the moments of every coordinate exactly as AdamW does,
and `after_step` reads the real m_t from the optimizer state and puts the filtered-out entries back to the
values saved in `after_backward`. This needs no engine change, reads m_t instead of recomputing it (no float
mismatch with fused kernels), and costs one transient copy of the filtered parameters per step instead of
the engine's index and value stash for ~(1 - alpha) of every tensor.

Deviation: the authors' optimizer applies decoupled weight decay to every entry before the filtered update,
so a filtered-out entry still decays; here it is held, the project's rule for any entry a strategy keeps
from moving. The two agree at weight_decay 0, the value of every fine-tuning script in the authors'
repository (finetune_metamathqa.sh, finetune_PMC.sh).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from epi.errors import UserError
from epi.schema import Schema, at_least, within
from epi.strategies.base import Context, Stage, Strategy, participating_params


def momentum_filter(momentum: Tensor, alpha: float) -> Tensor:
    """The entries MoFO lets move in one tensor: |m| at or above the k-th largest |m|, k = max(1, floor(alpha * n)),
    and not zero. An entry with m = 0 gets no Adam update anyway; leaving it out keeps a tensor with fewer than k
    nonzero moments (an embedding whose rows the batches never touched) from selecting, and so decaying, every
    entry of it, where every other unselected entry is held."""
    magnitude = momentum.detach().abs().reshape(-1)
    k = max(1, int(magnitude.numel() * alpha))
    threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    return ((magnitude >= threshold) & (magnitude > 0)).view_as(momentum)


@dataclass
class MoFOConfig(Schema):
    """MoFO's keys; defaults: conf/strategy/mofo.yaml."""

    alpha: Annotated[float, within(0, 1, open_low=True, why="the fraction of each filtered tensor updated per step (MoFO_fraction)")]
    include: dict[str, bool]  # embeddings / norms / biases: whether they are filtered (linear weights always are)
    log_every: Annotated[int, at_least(1)]  # steps between two `mask` lines in metrics.jsonl


class MoFO(Strategy):
    """Momentum-filtered updates: per tensor only the top-alpha entries by |Adam momentum| move each step (Chen et al. 2024, arXiv 2407.20999)."""

    name = "mofo"  # the registry name: conf/strategy/mofo.yaml
    Config = MoFOConfig

    def __init__(self, cfg: MoFOConfig):
        super().__init__(cfg)
        self.before: dict[str, Tensor] | None = None  # the filtered tensors' values before this step's update

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        self.filtered = participating_params(ctx.named_params, self.cfg.include)
        self.total = sum(p.numel() for p in ctx.named_params.values())
        self.unfiltered = self.total - sum(p.numel() for p in self.filtered.values())
        return stages

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Save the filtered tensors: the step updates them all, `after_step` puts the filtered-out entries back."""
        self.before = {name: p.detach().clone() for name, p in self.filtered.items()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Keep the update of the top-alpha entries by this step's |m_t| in each filtered tensor; undo the rest."""
        if self.before is None:  # a skipped update (schedule.nonfinite=skip) moved nothing
            return
        moved = self.unfiltered
        for name, param in self.filtered.items():
            momentum = self._momentum(name)
            if momentum is None:  # no gradient has reached it yet: the optimizer left it alone
                continue
            keep = momentum_filter(momentum, self.cfg.alpha)
            param.copy_(torch.where(keep, param, self.before[name]))
            moved += int(torch.count_nonzero(keep))
        self.before = None
        if step % self.cfg.log_every == 0:
            self.ctx.log(step, "mask", {"trained_fraction": moved / self.total, "isolated_fraction": 1 - moved / self.total})

    def _momentum(self, name: str) -> Tensor | None:
        """Adam's first moment of one parameter after this step (exp_avg), None before its first update."""
        state = self.ctx.optimizer_state(name)
        if not state:
            return None
        if "exp_avg" not in state:
            raise UserError(
                f"strategy=mofo filters by Adam's first moment (exp_avg), which this run's optimizer does not keep "
                f"(its state holds {sorted(state)}); use optimizer=adamw"
            )
        return state["exp_avg"]

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the filter is a function of the optimizer state, which the checkpoint holds."""
        return {}
