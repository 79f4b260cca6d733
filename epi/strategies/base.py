"""The interface between the training loop and an isolation strategy.

The trainer owns the loop; a strategy owns which parameters may move. Every step the trainer
calls, in this order:

    loss.backward()                 # token-weighted over the global batch
    strategy.after_backward(step)   # accumulate importance from the true gradients
    clip, optimizer.step(...)       # the isolation engine: isolated coordinates do not move
    strategy.after_step(step)       # e.g. refresh the mask every K steps, log mask statistics

plus `check_plan` at start-up (before any file is written), `prepare` once before training,
`on_stage_start` / `on_stage_end` around each stage, and `state_dict` / `load_state_dict` for
exact resume.

A strategy sees the run only through a `Context`: the parameters, the optimizer state it may
read, the isolation it may set, a metric log, an artifact writer, the seed and rank, and the
trainer's own step for training a copy of the model (CPI's probes). It never imports the
trainer. A new built-in strategy is one module here, whose class sets `name` and `Config`, and one
YAML file conf/strategy/<name>.yaml whose `_target_` names the class; nothing else changes (the
registry finds the class by scanning this package: docs/new-strategy.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from epi.errors import UserError
from epi.masks import Masks, mask_stats, participating
from epi.schema import Schema
from epi.sharding import Shards, local

# strategy.mode: the two readings of "isolating task-critical parameters" (PAPERS.md). `freeze`: an
# isolated coordinate moves for no task. `exclusive`: a coordinate critical to task t moves under t's
# gradient only (our reading of the papers' words; freeze stays the default until the tables say otherwise).
MODES = ("freeze", "exclusive")


@dataclass(frozen=True)
class Stage:
    """A contiguous block of steps trained on one task mixture."""

    name: str
    tasks: tuple[str, ...]
    steps: int
    weights: dict[str, float] = field(default_factory=dict)  # per task; missing = 1.0


class Context(Protocol):
    """Everything a strategy may see of a run; the trainer provides it (`epi.context.TrainerContext`)."""

    named_params: dict[str, torch.nn.Parameter]  # the trainable parameters, by name, in model order
    tasks: tuple[str, ...]  # the run's tasks
    seed: int  # the run's seed: seed every generator a strategy draws from with it
    rank: int  # this process's data-parallel rank (0 on one process)
    steps: int  # the run's step budget (`schedule.steps`) before a strategy changes the plan
    # parallel=fsdp: where this rank's shards lie, else None. The parameters are then DTensors: a strategy reads
    # a parameter, its .grad and its optimizer state as this rank's shard (`epi.sharding.local`), builds masks of
    # the local shards' shapes and passes `shards` to epi.masks' rankings and counts (see `Strategy.shardable`).
    shards: Shards | None

    def optimizer_state(self, name: str) -> dict[str, Any]:
        """The optimizer's state of one parameter (e.g. AdamW's `exp_avg_sq`); empty before the first step."""

    def optimizer_keeps(self, key: str) -> bool:
        """Whether the optimizer keeps `key` (e.g. "exp_avg_sq") for every parameter, tracking isolated ones too."""

    def masks(self) -> Masks:
        """The isolation now in force: True = frozen."""

    def set_masks(self, masks: Masks) -> dict[str, int]:
        """Replace the isolation (bool masks of the parameters' shapes); returns churn counts."""

    def exclusive_index(self) -> dict[str, dict[str, Tensor]]:
        """The task-exclusive coordinates now in force: task -> flat indices per parameter (that task's alone, or
        shared with the other tasks that own them; this rank's shards)."""

    def owner_counts(self) -> dict[str, dict[frozenset[str], int]]:
        """Per parameter, how many exclusive coordinates each set of tasks owns together (this rank's shards): every
        task's size, every pair's overlap and the union's size follow from it without a mask."""

    def set_exclusive(self, masks: dict[str, Masks]) -> dict[str, int]:
        """Replace the task-exclusive coordinates (task -> masks): each moves under its tasks' gradients
        only, and is held in a step whose batch has none of them; returns churn counts of their union."""

    def task_gradient(self, task: str, step: int, draw: int = 0) -> dict[str, Tensor]:
        """The gradient of the loss on one calibration batch of `task` alone at the current weights, with
        no update (call from `after_step`): per-task importance without per-task state. The batch is a pure
        function of the seed, `step`, the task and `draw` (another draw, another batch); its tokens are
        charged to the run's compute."""

    def mean_across_ranks(self, tensors: list[Tensor]) -> None:
        """Average tensors over data-parallel ranks in place, so every rank takes the same decision."""

    def log(self, step: int, split: str, metrics: dict[str, float], task: str | None = None) -> None:
        """Numbers to metrics.jsonl and W&B (rank 0 writes)."""

    def info(self, message: str) -> None:
        """A line for the console (rank 0 prints)."""

    def artifact(self, name: str, data: dict[str, Any], *, table: tuple[list[str], list[list[Any]]] | None = None,
                 heatmap: tuple[list[str], list[list[float]]] | None = None) -> None:
        """A result worth keeping: `data` goes to <run dir>/<name>.json; a `table` to W&B; a `heatmap` to a PNG and W&B."""

    def model_state(self) -> dict[str, Tensor]:
        """A detached copy of the model's weights (CPU tensors)."""

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        """Replace the model's weights (e.g. by a fused model) before training starts."""

    def train_copy(self, task: str, steps: int, lr: float) -> tuple[dict[str, Tensor], int, float]:
        """A copy of the current model fine-tuned on `task` alone with the trainer's own step (clipping,
        grad accumulation, precision, token-weighted loss, data parallel), no weight decay, constant lr;
        returns its weights (CPU), the trained tokens it consumed (counted in the run's compute) and its last loss.
        The run's model is not touched."""

    def charge(self, optimizer_steps: int, trained_tokens: int) -> None:
        """Count compute the run used but did not spend now (e.g. a probe read from a cache)."""

    def fingerprint(self, task: str) -> str:
        """A content key of what `train_copy(task, ...)` depends on besides its arguments: the model's
        config and weights, the task's training rows, the batch settings and the seed."""


@dataclass
class NoKeys(Schema):
    """A strategy without keys of its own."""


class Strategy:
    """Full fine-tuning: every parameter moves every step. Subclasses isolate some of them.

    `Config` is the schema of the strategy's keys (epi.schema), the one place they are declared;
    `build_strategy` checks the YAML's values against it and passes the typed result to the constructor
    as `cfg`. A built-in sets `name`, its registry name (its YAML is conf/strategy/<name>.yaml).
    """

    name: ClassVar[str | None] = None
    Config: type[Schema] = NoKeys
    # Runs under parallel=fsdp: it reads tensors only as local shards and ranks and counts through `ctx.shards`.
    # A strategy that needs whole tensors (CPI's probes and fusion) leaves it False, and the trainer refuses the pair.
    shardable: bool = False
    ctx: Context

    def __init__(self, cfg: Schema | None = None):
        self.cfg = cfg if cfg is not None else NoKeys()

    def check_plan(self, stages: list[Stage]) -> None:
        """Runs at start-up, before anything is written: refuse (UserError) a stage plan this strategy cannot serve."""

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        """Runs once before training; returns the stage plan to train (CPI replaces it by its groups)."""
        self.ctx = ctx
        return stages

    def on_stage_start(self, index: int, stage: Stage, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def on_stage_end(self, index: int, stage: Stage, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------- helpers strategies share (through the Context only)
def participating_params(named_params: dict[str, torch.nn.Parameter], include: dict[str, bool]) -> dict[str, torch.nn.Parameter]:
    """`epi.masks.participating` for a strategy's `include` key: a bad key stops the run as one `strategy.include:` line."""
    try:
        return participating(named_params, include)
    except ValueError as e:
        raise UserError(f"strategy.include: {e}") from e


def freeze_whole(ctx: Context, names: list[str] | set[str]) -> dict[str, float]:
    """Freezes every coordinate of the named parameters, and nothing else (the isolation now in force is replaced);
    returns `epi.masks.mask_stats` of it (`isolated_fraction`: over all parameters, summed over ranks under FSDP).
    Whole-tensor masks are all-True on whatever part of a parameter this rank holds, so this works on shards."""
    params = ctx.named_params
    masks = {n: torch.ones_like(local(params[n]), dtype=torch.bool) for n in names}
    ctx.set_masks(masks)
    return mask_stats(masks, {n: p.numel() for n, p in params.items()}, ctx.shards)
