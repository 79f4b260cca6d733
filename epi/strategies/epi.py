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
beta = optimizer.betas[1]) instead of a new buffer: no extra memory. The engine keeps feeding
isolated coordinates' true gradients into it (`isolation.moments=track`), so a frozen
coordinate's importance does not decay just because it is frozen.

`mode: exclusive` (our reading of "isolation", PAPERS.md): at each refresh every task of the current
stage gets its own top-p, ranked by the signal of its own gradient on one calibration batch of it
alone (`Context.task_gradient`: no per-task state is kept between refreshes), and the engine lets
those coordinates move under that task's gradient only. A task outside the stage keeps its last
mask: no data of it is read. `random` draws each task's coordinates at random instead.

Normalisation (`norm`) divides scores by their layer's mean (default) or max before the global
ranking, so a layer with larger gradients does not take the whole budget. Mean rather than max:
a single outlier coordinate would otherwise rescale its whole layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import combinations
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from epi.errors import TrainingDiverged, UserError
from epi.masks import (
    METHODS,
    NORMALIZE_METHODS,
    SCOPES,
    Masks,
    NonFiniteScores,
    count_stats,
    from_indices,
    hits,
    indices,
    jaccard,
    jaccard_counts,
    mask_stats,
    normalize,
    pack,
    top_p,
    union,
    unpack,
)
from epi.schema import Schema, at_least, within
from epi.sharding import local
from epi.strategies.base import MODES, Context, Stage, Strategy, participating_params

SIGNALS = ("sq_grad", "taylor", "abs_grad")


@dataclass
class EvolvingConfig(Schema):
    """Keys of every strategy that refreshes a top-p mask on a schedule (EPI, random); defaults: conf/strategy/shared/evolving.yaml."""

    p: Annotated[float, within(0, 1, open_low=True, why="the fraction of coordinates isolated (e.g. 0.01)")]
    refresh_every: Annotated[int, at_least(1)]
    warmup: Annotated[int, at_least(1, "importance needs gradients first")]
    hysteresis: Annotated[int, at_least(1)]
    scope: Literal[SCOPES]
    method: Literal[METHODS]
    sample_size: Annotated[int, at_least(1)]
    include: dict[str, bool]
    allow_no_isolation: bool
    mode: Literal[MODES]
    calibration_batches: Annotated[int, at_least(1)]

    def check(self, key: str) -> None:
        if self.mode == "exclusive" and self.hysteresis > 1:
            raise UserError(
                f"{key}.hysteresis={self.hysteresis} with {key}.mode=exclusive: hysteresis counts misses per coordinate, "
                "which per task would be a byte per parameter per task; use hysteresis=1 with exclusive isolation"
            )


class EvolvingIsolation(Strategy):
    """Refresh schedule, hysteresis, logging and state shared by EPI and its random control."""

    Config = EvolvingConfig
    shardable = True  # parallel=fsdp: importance, masks and statistics on local shards, rankings over all ranks

    def __init__(self, cfg: EvolvingConfig):
        super().__init__(cfg)
        self.refreshes = 0
        self.first_mask: dict[str, dict] | None = None  # bit-packed: the drift curve's reference
        self.misses: dict[str, Tensor] = {}  # hysteresis: consecutive refreshes an isolated coordinate missed the top set
        self.first_index: dict[str, dict[str, Tensor]] = {}  # exclusive: each task's first mask, flat indices (drift)
        self.stage_tasks: tuple[str, ...] = ()  # exclusive: the tasks whose masks a refresh recomputes

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        self.params = participating_params(ctx.named_params, self.cfg.include)
        self.numels = {n: p.numel() for n, p in ctx.named_params.items()}
        self.generator = torch.Generator().manual_seed(ctx.seed)  # same on every rank
        return stages

    def check_plan(self, stages: list[Stage]) -> None:
        """A run whose first mask comes too late is silently plain SFT: refuse it at start-up."""
        if self.cfg.allow_no_isolation:
            return
        total, first_end = sum(st.steps for st in stages), stages[0].steps
        fix = "lower strategy.warmup (the first mask's step), or set strategy.allow_no_isolation=true to run it anyway"
        if self.cfg.warmup > total:
            raise UserError(
                f"strategy.warmup={self.cfg.warmup}: the first mask would come after the run's last step ({total}), so "
                f"nothing would be isolated and the run would be plain SFT; {fix}"
            )
        if len(stages) > 1 and self.cfg.warmup > first_end:
            raise UserError(
                f"strategy.warmup={self.cfg.warmup}: the first mask would come after stage {stages[0].name!r} ends at step "
                f"{first_end}, so stage {stages[1].name!r} would start with nothing isolated to protect it; {fix}"
            )

    def is_refresh(self, step: int) -> bool:
        return step >= self.cfg.warmup and (step - self.cfg.warmup) % self.cfg.refresh_every == 0

    def importance(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def task_importance(self, task: str, step: int) -> dict[str, Tensor]:
        """`task`'s own importance at `step` (exclusive mode)."""
        raise NotImplementedError

    def on_stage_start(self, index: int, stage: Stage, step: int) -> None:
        self.stage_tasks = tuple(stage.tasks)

    def after_step(self, step: int) -> None:
        if self.is_refresh(step):
            self.refresh(step)

    def _select(self, scores: dict[str, Tensor], step: int) -> Masks:
        if self.ctx.shards is None:  # data parallel: identical masks on every rank (sharded: each rank ranks its shard)
            self.ctx.mean_across_ranks(list(scores.values()))
        try:
            return top_p(scores, self.cfg.p, self.cfg.scope, self.cfg.method, self.cfg.sample_size, self.generator,
                         self.ctx.shards)
        except NonFiniteScores as e:
            raise TrainingDiverged(
                f"step {step}: importance {e}: the gradients it averages overflowed or were NaN; no mask was set. "
                "Lower optimizer.lr or set schedule.clip_norm; with strategy.beta=null the importance is AdamW's exp_avg_sq."
            ) from e

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        if self.cfg.mode == "exclusive":
            self._refresh_exclusive(step)
            return
        tic = time.perf_counter()
        selected = self._select(self.importance(), step)
        old = {n: m.cpu() for n, m in self.ctx.masks().items()}
        new = self._apply_hysteresis(old, selected) if self.cfg.hysteresis > 1 else selected
        counts = self.ctx.set_masks(new)
        new_cpu = {n: m.cpu() for n, m in new.items()}
        if self.first_mask is None:
            self.first_mask = pack(new_cpu)
        self.refreshes += 1
        shards = self.ctx.shards
        stats = mask_stats(new_cpu, self.numels, shards)
        self.ctx.log(
            step,
            "mask",
            {
                **stats,
                "protected": counts["protected"],
                "released": counts["released"],
                "jaccard_prev": jaccard(old, new_cpu, shards) if self.refreshes > 1 else 1.0,
                "jaccard_first": jaccard(unpack(self.first_mask), new_cpu, shards),
                "refresh_seconds": time.perf_counter() - tic,
            },
        )

    def _refresh_exclusive(self, step: int) -> None:
        """Every task of the current stage gets its own top-p from its own importance; the others keep theirs.
        Logged per task: its mask's size and drift (Jaccard with its first and previous mask) and its overlap
        with every other task's mask; and for the union, what `refresh` logs. The sizes and overlaps are counted
        from the engine's owner sets and the drift at the earlier masks' coordinates, not from masks compared whole."""
        tic = time.perf_counter()
        shards = self.ctx.shards
        old = self.ctx.exclusive_index()
        shapes = {n: local(p).shape for n, p in self.ctx.named_params.items()}
        stage = self.stage_tasks or self.ctx.tasks
        new: dict[str, Masks] = {}  # in the engine's task order, then the stage's new tasks (the order of its owner bits)
        for task in [*old, *(t for t in stage if t not in old)]:
            new[task] = ({n: m.cpu() for n, m in self._select(self.task_importance(task, step), step).items()} if task in stage
                         else from_indices(old[task], shapes))  # a task outside the stage keeps its mask
        for task, masks in new.items():
            if task not in self.first_index:
                self.first_index[task] = indices(masks)
        kept_prev = {task: hits(old[task], masks) for task, masks in new.items() if task in old}
        kept_first = {task: hits(self.first_index[task], masks) for task, masks in new.items()}
        counts = self.ctx.set_exclusive(new)
        self.refreshes += 1
        owners = self.ctx.owner_counts()
        size = {task: {n: sum(c for tasks, c in sets.items() if task in tasks) for n, sets in owners.items()} for task in new}
        total = {task: sum(per_param.values()) for task, per_param in size.items()}
        shared: dict[frozenset[str], int] = {}  # per pair of tasks, the coordinates both own
        for sets in owners.values():
            for tasks, c in sets.items():
                for pair in combinations(sorted(tasks), 2):
                    shared[frozenset(pair)] = shared.get(frozenset(pair), 0) + c
        for task in new:
            before = sum(int(i.numel()) for i in old.get(task, {}).values())
            first = sum(int(i.numel()) for i in self.first_index[task].values())
            self.ctx.log(step, "mask", {
                "isolated_fraction": count_stats(size[task], self.numels, shards)["isolated_fraction"],
                "jaccard_prev": jaccard_counts(kept_prev[task], before, total[task], shards) if task in old else 1.0,
                "jaccard_first": jaccard_counts(kept_first[task], first, total[task], shards),
            }, task=task)
            overlap = {other: jaccard_counts(shared.get(frozenset((task, other)), 0), total[task], total[other], shards)
                       for other in new if other != task}
            self.ctx.log(step, "mask_overlap", overlap, task=task)
        together = union(*new.values())
        if self.first_mask is None:
            self.first_mask = pack(together)
        kept = counts["kept"]  # the churn counts are summed over ranks already
        self.ctx.log(step, "mask", {
            **count_stats({n: sum(sets.values()) for n, sets in owners.items()}, self.numels, shards),
            "protected": counts["protected"],
            "released": counts["released"],
            "jaccard_prev": jaccard_counts(kept, kept + counts["released"], kept + counts["protected"]) if old else 1.0,
            "jaccard_first": jaccard(unpack(self.first_mask), together, shards),
            "refresh_seconds": time.perf_counter() - tic,
        })

    def _apply_hysteresis(self, old: Masks, selected: Masks) -> Masks:
        """Release an isolated coordinate only after it missed the top set on `hysteresis` refreshes in a row."""
        new = {}
        for name, sel in selected.items():
            was = old.get(name, torch.zeros_like(sel)).to(sel.device)
            misses = self.misses.get(name, torch.zeros(sel.shape, dtype=torch.uint8, device=sel.device))
            misses = torch.where(was & ~sel, misses + 1, torch.zeros_like(misses))
            keep = was & ~sel & (misses < self.cfg.hysteresis)
            self.misses[name] = torch.where(keep, misses, torch.zeros_like(misses))
            new[name] = sel | keep
        return new

    def state_dict(self) -> dict[str, Any]:
        return {
            "refreshes": self.refreshes,
            "first_mask": self.first_mask,
            "misses": self.misses,
            "generator": self.generator.get_state(),
            "first_index": self.first_index,
            "stage_tasks": list(self.stage_tasks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refreshes = state["refreshes"]
        self.first_mask = state["first_mask"]
        self.misses = state["misses"]
        self.generator.set_state(state["generator"])
        self.first_index = state.get("first_index", {})  # absent from checkpoints written before exclusive mode
        self.stage_tasks = tuple(state.get("stage_tasks", ()))


@dataclass
class EPIConfig(EvolvingConfig):
    """EPI's keys; defaults: conf/strategy/epi.yaml."""

    signal: Literal[SIGNALS]
    beta: Annotated[float, within(0, 1, open_high=True, why="or null to reuse AdamW's second moment")] | None
    norm: Literal[NORMALIZE_METHODS]

    def check(self, key: str) -> None:
        super().check(key)
        if self.beta is None and self.signal != "sq_grad":
            raise UserError(f"{key}.beta=null reuses AdamW's EMA of g^2, which only fits signal=sq_grad; set {key}.beta (e.g. 0.99) for signal={self.signal}")


class EPI(EvolvingIsolation):
    """Evolving Parameter Isolation: the top-p coordinates by online gradient importance, refreshed every K steps."""

    name = "epi"  # the registry name: conf/strategy/epi.yaml
    Config = EPIConfig

    def __init__(self, cfg: EPIConfig):
        super().__init__(cfg)
        self.ema: dict[str, Tensor] = {}

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        if self.cfg.beta is None and not ctx.optimizer_keeps("exp_avg_sq"):
            raise UserError(
                "strategy.beta=null reuses the optimizer's second moment (Adam's exp_avg_sq), which this run's optimizer "
                "does not keep for every coordinate (it needs an Adam-type optimizer and isolation.moments=track); "
                "give strategy.beta a value for a separate EMA"
            )
        if self.cfg.beta is not None:
            self.ema = {n: torch.zeros_like(local(p), dtype=torch.float32) for n, p in self.params.items()}
        return stages

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Accumulate importance from the true gradients, before the engine hides isolated ones."""
        if self.cfg.beta is None:
            return
        for name, ema in self.ema.items():
            param = self.params[name]
            if param.grad is None:
                continue
            g, param = local(param.grad), local(param)
            signal = g * g if self.cfg.signal == "sq_grad" else (g * param if self.cfg.signal == "taylor" else g).abs()
            ema.mul_(self.cfg.beta).add_(signal, alpha=1 - self.cfg.beta)

    def task_importance(self, task: str, step: int) -> dict[str, Tensor]:
        """The signal of `task`'s gradient, summed over `calibration_batches` calibration batches (no EMA: no
        per-task state), normalised."""
        raw: dict[str, Tensor] = {}
        for draw in range(self.cfg.calibration_batches):
            grads = self.ctx.task_gradient(task, step, draw)
            for name, param in self.params.items():
                g, param = grads[name].float(), local(param)  # handed over, not the parameter's: the signal is taken in place
                signal = g.mul_(g) if self.cfg.signal == "sq_grad" else g.mul_(param).abs_() if self.cfg.signal == "taylor" else g.abs_()
                raw[name] = raw[name].add_(signal) if name in raw else signal
            del grads
        return normalize(raw, self.cfg.norm, self.ctx.shards)

    def importance(self) -> dict[str, Tensor]:
        if self.cfg.beta is None:
            states = {n: self.ctx.optimizer_state(n) for n in self.params}
            raw = {n: local(state["exp_avg_sq"]) for n, state in states.items() if "exp_avg_sq" in state}
        else:
            raw = self.ema
        return normalize(raw, self.cfg.norm, self.ctx.shards)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, value in state["ema"].items():
            self.ema[name].copy_(value)
