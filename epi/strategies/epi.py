"""`strategy=epi`: Evolving Parameter Isolation (Lin et al., 2026).

Importance is estimated online from gradients; every `refresh_every` steps (from step `warmup`
on) the top-p most important coordinates are isolated and the rest released, so the protected
set follows importance as it drifts. Isolation itself is the engine's (`IsolatedOptimizer`):
isolated coordinates do not move, weight decay and momentum included.

Importance signals (`signal`), each an EMA with factor `beta`:
  sq_grad  g^2            (default; the paper's signal)
  taylor   |g * theta|    (first-order Taylor estimate of the loss change if the weight were zeroed)
  abs_grad |g|
`beta: null` with `sq_grad` reuses AdamW's own second moment (exp_avg_sq, an EMA of g^2 with
beta = schedule.betas[1]) instead of a new buffer: no extra memory. The engine keeps feeding
isolated coordinates' true gradients into it (`schedule.isolated_moments=track`), so a frozen
coordinate's importance does not decay just because it is frozen.

Normalisation (`norm`) divides scores by their layer's mean (default) or max before the global
ranking, so a layer with larger gradients does not take the whole budget. Mean rather than max:
a single outlier coordinate would otherwise rescale its whole layer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from epi.errors import TrainingDiverged, UserError
from epi.masks import (
    METHODS,
    NORMALIZE_METHODS,
    NonFiniteScores,
    SCOPES,
    Masks,
    jaccard,
    mask_stats,
    normalize,
    pack,
    participating,
    top_p,
    unpack,
)
from epi.strategies.base import Stage, Strategy

if TYPE_CHECKING:
    from epi.trainer import Trainer

SIGNALS = ("sq_grad", "taylor", "abs_grad")


def _choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise UserError(f"strategy.{key}={value!r}: must be one of {list(valid)}")


class EvolvingIsolation(Strategy):
    """Refresh schedule, hysteresis, logging and state shared by EPI and its random control."""

    def __init__(
        self,
        p: float = 0.01,
        refresh_every: int = 100,
        warmup: int = 100,
        hysteresis: int = 1,
        scope: str = "global",
        method: str = "sampled",
        sample_size: int = 1_000_000,
        include: dict[str, bool] | None = None,
        allow_no_isolation: bool = False,
    ):
        if not 0 < p <= 1:
            raise UserError(f"strategy.p={p!r}: must be in (0, 1], the fraction of coordinates isolated (e.g. 0.01)")
        for key, value in (("refresh_every", refresh_every), ("hysteresis", hysteresis), ("sample_size", sample_size)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"strategy.{key}={value!r}: must be an integer >= 1")
        if not isinstance(warmup, int) or warmup < 1:
            raise UserError(f"strategy.warmup={warmup!r}: must be an integer >= 1 (importance needs gradients first)")
        _choice("scope", scope, SCOPES)
        _choice("method", method, METHODS)
        self.p, self.refresh_every, self.warmup, self.hysteresis = p, refresh_every, warmup, hysteresis
        self.scope, self.method, self.sample_size = scope, method, sample_size
        self.include = dict(include or {})
        self.allow_no_isolation = allow_no_isolation
        self.refreshes = 0
        self.first_mask: dict[str, dict] | None = None  # bit-packed: the drift curve's reference
        self.misses: dict[str, Tensor] = {}  # hysteresis: consecutive refreshes an isolated coordinate missed the top set

    def prepare(self, trainer: Trainer, stages: list[Stage]) -> list[Stage]:
        super().prepare(trainer, stages)
        try:
            self.params = participating(trainer.named_params, self.include)
        except ValueError as e:
            raise UserError(f"strategy.include: {e}") from e
        self.numels = {n: p.numel() for n, p in trainer.named_params.items()}
        self.generator = torch.Generator().manual_seed(trainer.cfg.seed)  # same on every rank
        return stages

    def check_plan(self, stages: list[Stage]) -> None:
        """A run whose first mask comes too late is silently plain SFT: refuse it at start-up."""
        if self.allow_no_isolation:
            return
        total, first_end = sum(st.steps for st in stages), stages[0].steps
        fix = "lower strategy.warmup (the first mask's step), or set strategy.allow_no_isolation=true to run it anyway"
        if self.warmup > total:
            raise UserError(
                f"strategy.warmup={self.warmup}: the first mask would come after the run's last step ({total}), so "
                f"nothing would be isolated and the run would be plain SFT; {fix}"
            )
        if len(stages) > 1 and self.warmup > first_end:
            raise UserError(
                f"strategy.warmup={self.warmup}: the first mask would come after stage {stages[0].name!r} ends at step "
                f"{first_end}, so stage {stages[1].name!r} would start with nothing isolated to protect it; {fix}"
            )

    def is_refresh(self, step: int) -> bool:
        return step >= self.warmup and (step - self.warmup) % self.refresh_every == 0

    def importance(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        if self.is_refresh(step):
            self.refresh(step)

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        tic = time.perf_counter()
        optimizer = self.trainer.optimizer
        scores = self.importance()
        if dist.is_available() and dist.is_initialized():  # identical masks on every rank
            for s in scores.values():
                dist.all_reduce(s, op=dist.ReduceOp.AVG)
        try:
            selected = top_p(scores, self.p, self.scope, self.method, self.sample_size, self.generator)
        except NonFiniteScores as e:
            raise TrainingDiverged(
                f"step {step}: importance {e}: the gradients it averages overflowed or were NaN; no mask was set. "
                "Lower schedule.lr or set schedule.clip_norm; with strategy.beta=null the importance is AdamW's exp_avg_sq."
            ) from e
        old = {n: m.cpu() for n, m in optimizer.masks.items()}
        new = self._apply_hysteresis(old, selected) if self.hysteresis > 1 else selected
        counts = optimizer.set_masks(new)
        new_cpu = {n: m.cpu() for n, m in new.items()}
        if self.first_mask is None:
            self.first_mask = pack(new_cpu)
        self.refreshes += 1
        stats = mask_stats(new_cpu, self.numels)
        self.trainer.logger.log(
            step,
            "mask",
            {
                **stats,
                "protected": counts["protected"],
                "released": counts["released"],
                "jaccard_prev": jaccard(old, new_cpu) if self.refreshes > 1 else 1.0,
                "jaccard_first": jaccard(unpack(self.first_mask), new_cpu),
                "refresh_seconds": time.perf_counter() - tic,
            },
        )

    def _apply_hysteresis(self, old: Masks, selected: Masks) -> Masks:
        """Release an isolated coordinate only after it missed the top set on `hysteresis` refreshes in a row."""
        new = {}
        for name, sel in selected.items():
            was = old.get(name, torch.zeros_like(sel)).to(sel.device)
            misses = self.misses.get(name, torch.zeros(sel.shape, dtype=torch.uint8, device=sel.device))
            misses = torch.where(was & ~sel, misses + 1, torch.zeros_like(misses))
            keep = was & ~sel & (misses < self.hysteresis)
            self.misses[name] = torch.where(keep, misses, torch.zeros_like(misses))
            new[name] = sel | keep
        return new

    def state_dict(self) -> dict[str, Any]:
        return {
            "refreshes": self.refreshes,
            "first_mask": self.first_mask,
            "misses": self.misses,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refreshes = state["refreshes"]
        self.first_mask = state["first_mask"]
        self.misses = state["misses"]
        self.generator.set_state(state["generator"])


class EPI(EvolvingIsolation):
    def __init__(self, signal: str = "sq_grad", beta: float | None = None, norm: str = "mean", **kwargs: Any):
        super().__init__(**kwargs)
        _choice("signal", signal, SIGNALS)
        _choice("norm", norm, NORMALIZE_METHODS)
        if beta is None and signal != "sq_grad":
            raise UserError(f"strategy.beta=null reuses AdamW's EMA of g^2, which only fits signal=sq_grad; set strategy.beta (e.g. 0.99) for signal={signal}")
        if beta is not None and not 0 <= beta < 1:
            raise UserError(f"strategy.beta={beta!r}: must be in [0, 1), or null to reuse AdamW's second moment")
        self.signal, self.beta, self.norm = signal, beta, norm
        self.ema: dict[str, Tensor] = {}

    def prepare(self, trainer: Trainer, stages: list[Stage]) -> list[Stage]:
        super().prepare(trainer, stages)
        if self.beta is None and trainer.optimizer.moments != "track":
            raise UserError(
                "strategy.beta=null reuses AdamW's second moment, which must keep tracking isolated coordinates: "
                "set schedule.isolated_moments=track, or give strategy.beta a value for a separate EMA"
            )
        if self.beta is not None:
            self.ema = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        return stages

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Accumulate importance from the true gradients, before the engine hides isolated ones."""
        if self.beta is None:
            return
        for name, ema in self.ema.items():
            param = self.params[name]
            g = param.grad
            if g is None:
                continue
            signal = g * g if self.signal == "sq_grad" else (g * param if self.signal == "taylor" else g).abs()
            ema.mul_(self.beta).add_(signal, alpha=1 - self.beta)

    def importance(self) -> dict[str, Tensor]:
        if self.beta is None:
            state = self.trainer.optimizer.optimizer.state
            raw = {n: state[p]["exp_avg_sq"] for n, p in self.params.items() if "exp_avg_sq" in state[p]}
        else:
            raw = self.ema
        return normalize(raw, self.norm)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, value in state["ema"].items():
            self.ema[name].copy_(value)
