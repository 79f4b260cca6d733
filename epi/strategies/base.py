"""The interface between the training loop and an isolation strategy.

The trainer owns the loop; a strategy owns which parameters may move. Every step the trainer
calls, in this order:

    loss.backward()
    strategy.after_backward(step)   # accumulate importance, hide isolated gradients
    clip_grad_norm_(...)            # sees only the gradients that will be applied
    optimizer.step(clip_coef)       # IsolatedOptimizer: isolated coordinates do not move
    strategy.after_step(step)       # e.g. refresh the mask every K steps, log mask statistics

plus `check_plan` at start-up (before any file is written), `prepare` once before training,
`on_stage_start` / `on_stage_end` around each stage, and `state_dict` / `load_state_dict` for
exact resume. A new strategy is one module here and one
YAML file in conf/strategy/ whose `_target_` names its class; nothing in the trainer changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epi.trainer import Trainer


@dataclass(frozen=True)
class Stage:
    """A contiguous block of steps trained on one task mixture."""

    name: str
    tasks: tuple[str, ...]
    steps: int
    weights: dict[str, float] = field(default_factory=dict)  # per task; missing = 1.0


class Strategy:
    """Full fine-tuning: every parameter moves every step. Subclasses isolate some of them."""

    def check_plan(self, stages: list[Stage]) -> None:
        """Runs at start-up, before anything is written: refuse (UserError) a stage plan this strategy cannot serve."""

    def prepare(self, trainer: Trainer, stages: list[Stage]) -> list[Stage]:
        """Runs once before training; returns the stage plan to train (CPI replaces it by its groups)."""
        self.trainer = trainer
        return stages

    def on_stage_start(self, stage: Stage, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def on_stage_end(self, stage: Stage, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
