"""`strategy=cpi`: Core Parameter Isolation Fine-Tuning (Wang, Liang, Peng, EMNLP 2025).

The whole pipeline runs in `prepare`, before the trainer's loop:
1. probe    from theta0, fine-tune a copy on each task alone (`probe_steps`, `probe_lr`); cached
            by a content key (model, task data, probe settings), so a sweep over p, tau, omega
            or the order reuses the probes
2. cores    per task, the top-p coordinates by |theta_i - theta0| (one global ranking by default)
3. groups   Jaccard overlap of the cores; tasks with overlap >= tau are linked; groups are the
            connected components; stage order random (seeded), given, or heuristic (the multi-stage
            baseline can instead cut the ordered tasks into `k` stages: the paper's "K=3")
4. fuse     transplant each task's core values, SLERP the task models elsewhere (epi/merge.py)
and returns one stage per group. The trainer then trains the stages in order; at the start of
stage k the cores of all tasks of groups 1..k-1 are frozen through the isolation engine. What a
stage trains on is `stage_data`: `mixed` (every task, equal weight: the paper's "pipelined SFT on
mixed-task data", where the groups decide only when cores freeze) or `group` (the group's tasks
alone: the classic multi-stage reading, and sequential A-then-B training).

`mode: exclusive` reads "isolation" the other way (PAPERS.md): from stage k on, the cores of each
earlier group move under that group's tasks' gradients only (with `stage_data: mixed` they keep
learning their own tasks; with `group` they are held, as frozen ones would be).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from epi.checkpoint import load_tensors
from epi.errors import TrainingDiverged, UnsafeFile, UserError
from epi.masks import SCOPES, Masks, NonFiniteScores, all_finite, jaccard, mask_stats, top_p, union
from epi.merge import SPACES, fuse
from epi.schema import Schema, at_least, positive, within
from epi.sharding import Shards, local
from epi.strategies.base import MODES, Context, Stage, Strategy, participating_params

ORDERS = ("random", "given", "heuristic")
STAGE_DATA = ("mixed", "group")


# ---------------------------------------------------------------- pure steps of the pipeline
def core_regions(base: dict[str, Tensor], tuned: dict[str, Tensor], p: float, scope: str = "global",
                 shards: Shards | None = None) -> Masks:
    """C_i: the top-p coordinates by update magnitude |theta_i - theta0| (exact ranking; over every rank's shards)."""
    return top_p({n: (tuned[n].float() - base[n].float()).abs() for n in base}, p, scope=scope, method="exact", shards=shards)


def overlap_matrix(cores: dict[str, Masks], shards: Shards | None = None) -> list[list[float]]:
    names = list(cores)
    return [[jaccard(cores[a], cores[b], shards) for b in names] for a in names]


def connected_groups(names: list[str], overlap: list[list[float]], tau: float) -> list[list[str]]:
    """Connected components of the graph linking tasks whose core overlap is >= tau (tau = 0 links all)."""
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if overlap[i][j] >= tau:
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(root(i), []).append(name)
    return list(groups.values())


def order_groups(groups: list[list[str]], order: str, *, seed: int, given: list[str], mass: dict[str, float]) -> list[list[str]]:
    """random: seeded shuffle (the paper's main setting). given: by the first listed task of each group.
    heuristic (our choice; the paper's is not public): the group whose cores moved the model most
    (largest summed |delta| over its tasks' cores) first, so the largest cores are frozen earliest."""
    if order == "random":
        shuffled = list(groups)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    if order == "given":
        rank = {task: i for i, task in enumerate(given)}
        return sorted(groups, key=lambda g: min(rank[t] for t in g))
    return sorted(groups, key=lambda g: -sum(mass[t] for t in g))


def cut_into_stages(ordered: list[str], k: int) -> list[list[str]]:
    """The multi-stage baseline's K stages (CPI-FT's "multi-stage, K=3"): the tasks, already in stage order, cut into
    k contiguous runs whose sizes differ by at most one, the larger ones first (5 tasks, K=3: 2, 2, 1)."""
    sizes = [len(ordered) // k + (i < len(ordered) % k) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(k)]
    return [ordered[a : a + n] for a, n in zip(starts, sizes)]


# ---------------------------------------------------------------- the strategy
@dataclass
class CPIConfig(Schema):
    """CPI-FT's keys (multistage's too); defaults: conf/strategy/cpi.yaml."""

    p: Annotated[float, within(0, 1, open_low=True, why="the fraction of coordinates in a task's core (e.g. 0.01)")]
    tau: Annotated[float, at_least(0, "Jaccard threshold linking two tasks; the paper uses 0.1")]
    omega: Annotated[float, within(0, 1, why="0 = base, 1 = merged task models")]
    eps: Annotated[float, positive("colinear threshold of SLERP, e.g. 1e-4")]
    space: Literal[SPACES]
    order: Literal[ORDERS]
    given_order: list[str] | None
    k: Annotated[int, at_least(1, "the number of stages the tasks are cut into (the paper's multi-stage baseline: K=3)")] | None
    stage_steps: Annotated[int, at_least(1)] | None
    stage_data: Literal[STAGE_DATA]
    probe_steps: Annotated[int, at_least(1)]
    probe_lr: Annotated[float, positive()]
    scope: Literal[SCOPES]
    include: dict[str, bool]
    cache_dir: str
    count_probes_in_budget: bool
    mode: Literal[MODES]

    def check(self, key: str) -> None:
        if self.order == "given" and not self.given_order:
            raise UserError(f"{key}.order=given needs {key}.given_order=[task, ...]")
        if self.count_probes_in_budget and self.stage_steps is not None and self.stage_steps <= self.probe_steps:
            raise UserError(f"{key}.count_probes_in_budget=true: a stage gives up its own task's probe, and {key}.stage_steps="
                            f"{self.stage_steps} leaves nothing after {key}.probe_steps={self.probe_steps}; raise stage_steps or lower probe_steps")


class CPI(Strategy):
    """Core Parameter Isolation: probe each task, cores by update size, groups by core overlap, fuse, stages with earlier cores frozen."""

    name = "cpi"  # the registry name: conf/strategy/cpi.yaml
    Config = CPIConfig
    fuse_models = True
    freeze_cores = True
    # parallel=fsdp: probes train the run's sharded model (returning this rank's shards), cores by a ranking over every
    # rank's shards, SLERP's norms and dot products summed over ranks: the unsharded pipeline, shard by shard.
    shardable = True

    def __init__(self, cfg: CPIConfig):
        super().__init__(cfg)
        if cfg.k is not None and (self.fuse_models or self.freeze_cores):
            raise UserError(f"strategy.k={cfg.k}: cutting the tasks into K stages is the multi-stage baseline's (strategy=multistage); "
                            f"CPI-FT's stages are its core-overlap groups (strategy.tau), so leave strategy.k=null")
        self.cache_dir = Path(cfg.cache_dir)
        self.cores: dict[str, Masks] = {}
        self.groups: list[list[str]] = []
        self.probed = True  # False: a multi-stage run cut into K stages in a random or given order, which needs no cores

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        tasks = list(ctx.tasks)
        if self.cfg.order == "given" and sorted(self.cfg.given_order) != sorted(tasks):
            raise UserError(f"strategy.given_order={self.cfg.given_order}: must list each task of data.tasks={tasks} once")
        if self.cfg.k is not None and len(tasks) < self.cfg.k:
            raise UserError(f"strategy.k={self.cfg.k}: more stages than the {len(tasks)} tasks of data.tasks={tasks}")
        self.probed = self.cfg.k is None or self.cfg.order == "heuristic"  # K stages in a random or given order need no cores
        if not self.probed:
            self.groups = self._ordered_stages(tasks, ctx.seed, mass={})
            self._announce(ctx)
            return self._stages(ctx, tasks)
        names = list(participating_params(ctx.named_params, self.cfg.include))  # model order: ties in |delta| break the same way in every process
        base = ctx.model_state()
        tuned = {task: self.probe(task) for task in tasks}
        shards = ctx.shards
        try:
            self.cores = {
                task: core_regions({n: base[n] for n in names}, tuned[task], self.cfg.p, self.cfg.scope, shards) for task in tasks
            }
        except NonFiniteScores as e:
            raise TrainingDiverged(
                f"cpi: a probe diverged (its update {e}); lower strategy.probe_lr (now {self.cfg.probe_lr:g})"
            ) from e
        overlap = overlap_matrix(self.cores, shards)
        sums = {t: [float((tuned[t][n] - base[n]).abs()[m].sum()) for n, m in self.cores[t].items()] for t in tasks}
        mass = {t: float(shards.sum(torch.tensor(v, dtype=torch.float64)).sum()) if shards else sum(v) for t, v in sums.items()}
        if self.cfg.k is None:
            self.groups = order_groups(connected_groups(tasks, overlap, self.cfg.tau), self.cfg.order, seed=ctx.seed,
                                       given=self.cfg.given_order or [], mass=mass)
        else:
            self.groups = self._ordered_stages(tasks, ctx.seed, mass)
        ctx.artifact("cpi/overlap", {"tasks": tasks, "jaccard": overlap},
                     table=(["task", *tasks], [[t, *row] for t, row in zip(tasks, overlap)]), heatmap=(tasks, overlap))
        self._announce(ctx)
        if self.freeze_cores and len(self.groups) == 1:
            ctx.info(f"cpi: all tasks form one group at tau={self.cfg.tau}, so no cores are frozen: after fusion this run is plain SFT")
        if self.fuse_models:
            fused, paths = fuse(base, tuned, self.cores, omega=self.cfg.omega, eps=self.cfg.eps, space=self.cfg.space,
                                reduce=shards.sum if shards else None)
            ctx.load_model_state(fused)
            ctx.artifact("cpi/fusion_paths", paths)
            totals = {k: sum(v[k] for v in paths.values()) for k in ("slerp", "linear", "zero")}
            ctx.log(0, "cpi", {f"fusion_{k}": v for k, v in totals.items()})
        return self._stages(ctx, tasks)

    def _ordered_stages(self, tasks: list[str], seed: int, mass: dict[str, float]) -> list[list[str]]:
        """`k` set: each task its own group, put in `order`, then cut into k stages (`cut_into_stages`)."""
        ordered = order_groups([[t] for t in tasks], self.cfg.order, seed=seed, given=self.cfg.given_order or [], mass=mass)
        return cut_into_stages([t for (t,) in ordered], self.cfg.k)

    def _announce(self, ctx: Context) -> None:
        ctx.artifact("cpi/groups", {"tau": self.cfg.tau, "k": self.cfg.k, "order": self.cfg.order, "groups": self.groups},
                     table=(["stage", "tasks"], [[i, ", ".join(g)] for i, g in enumerate(self.groups)]))
        ctx.log(0, "cpi", {"groups": float(len(self.groups))})
        ctx.info(f"cpi: groups in stage order: {self.groups}")

    def _stages(self, ctx: Context, tasks: list[str]) -> list[Stage]:
        return [Stage(f"group{i}", tuple(g if self.cfg.stage_data == "group" else tasks), self._stage_steps(ctx, g, len(tasks)))
                for i, g in enumerate(self.groups)]

    def _stage_steps(self, ctx: Context, group: list[str], n_tasks: int) -> int:
        """A stage's steps: `stage_steps`, or the run's budget shared by the groups. Under `count_probes_in_budget` the
        probes come out of it: with `stage_steps`, each stage gives up its own group's probes (train A then B at
        stage_steps each: A's stage is stage_steps - probe_steps, so the run spends 2 x stage_steps, like `none`)."""
        if self.cfg.stage_steps is None:
            return max(1, self._budget(ctx, n_tasks) // len(self.groups))
        if not (self.cfg.count_probes_in_budget and self.probed):
            return self.cfg.stage_steps
        left = self.cfg.stage_steps - self.cfg.probe_steps * len(group)
        if left < 1:
            raise UserError(
                f"strategy.count_probes_in_budget=true: the probes of group {group} (strategy.probe_steps={self.cfg.probe_steps} each) "
                f"take all of strategy.stage_steps={self.cfg.stage_steps}; raise stage_steps or lower probe_steps"
            )
        return left

    def _budget(self, ctx: Context, n_tasks: int) -> int:
        """Steps left for the stages: the run's, less the probes' when `count_probes_in_budget` (equal compute)."""
        if not (self.cfg.count_probes_in_budget and self.probed):
            return ctx.steps
        left = ctx.steps - self.cfg.probe_steps * n_tasks
        if left < 1:
            raise UserError(
                f"strategy.count_probes_in_budget=true: the {n_tasks} probes of strategy.probe_steps={self.cfg.probe_steps} "
                f"take all of schedule.steps={ctx.steps}; raise schedule.steps or lower strategy.probe_steps"
            )
        return left

    def on_stage_start(self, index: int, stage: Stage, step: int) -> None:
        """Stage k of the plan `prepare` returned trains group k, with the cores of groups 0..k-1 frozen."""
        if not self.freeze_cores:
            return
        earlier = [self.cores[t] for g in self.groups[:index] for t in g]
        isolated = union(*earlier) if earlier else {}
        if self.cfg.mode == "exclusive":  # a group's cores move under that group's tasks only
            self.ctx.set_exclusive({t: union(*(self.cores[u] for u in g)) for g in self.groups[:index] for t in g})
        else:
            self.ctx.set_masks(isolated)
        numels = {n: p.numel() for n, p in self.ctx.named_params.items()}  # whole parameters, sharded or not
        fraction = mask_stats(isolated, numels, self.ctx.shards)["isolated_fraction"]
        self.ctx.log(step, "mask", {"isolated_fraction": fraction, "stage": index})

    # ------------------------------------------------------------ probes
    def probe(self, task: str) -> dict[str, Tensor]:
        """theta_i: a copy of theta0 fine-tuned on `task` alone; loaded from the cache when the same probe ran before
        (its compute is charged to this run all the same, so compute columns compare like with like). A probe whose
        weights are not finite stops the run naming strategy.probe_lr, and is never cached."""
        key = f"{task}-{self.probe_key(task)}"
        shards = self.ctx.shards  # parallel=fsdp: each rank caches its own shards of the probe
        path = self.cache_dir / (f"{key}.rank{shards.rank}of{shards.world}.pt" if shards else f"{key}.pt")
        if path.is_file() and (cached := self._cached_probe(task, path)) is not None:
            self.ctx.log(0, "cpi", {"probe_cache_hit": 1.0}, task=task)
            self.ctx.info(f"cpi: probe of {task!r} from cache {path}")
            self.ctx.charge(self.cfg.probe_steps, cached["trained_tokens"])
            return cached["weights"]
        self.ctx.log(0, "cpi", {"probe_cache_hit": 0.0}, task=task)
        diverged = (f"cpi: the probe of {task!r} diverged ({{why}}); nothing was cached. Lower strategy.probe_lr (now "
                    f"{self.cfg.probe_lr:g}) or strategy.probe_steps (now {self.cfg.probe_steps}).")
        try:
            tuned, trained_tokens, final_loss = self.ctx.train_copy(task, self.cfg.probe_steps, self.cfg.probe_lr)
        except TrainingDiverged as e:
            raise TrainingDiverged(diverged.format(why=e)) from e
        if bad := [n for n, t in tuned.items() if not all_finite(t)]:
            raise TrainingDiverged(diverged.format(why=f"its weights are not finite after {self.cfg.probe_steps} step(s), e.g. {bad[0]}"))
        self.ctx.log(0, "cpi", {"probe_final_loss": final_loss}, task=task)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # data-parallel ranks probe too: no shared temp file
        torch.save({"weights": tuned, "trained_tokens": trained_tokens}, tmp)
        tmp.replace(path)
        return tuned

    def _cached_probe(self, task: str, path: Path) -> dict[str, Any] | None:
        """The cache file's probe, or None (said in one line) when it is not one this run can use: unreadable, another
        structure, other parameters or shapes, or non-finite weights. It is probed again and the file replaced. A
        file that asks to run code stops the run instead (`UnsafeFile`): that is tampering, not a stale cache."""
        expected = {n: local(p).shape for n, p in self.ctx.named_params.items()}  # this rank's shards under fsdp
        why = None
        try:
            cached = load_tensors(path, "file")
        except UnsafeFile as e:  # tampering, not wear: the run stops and says so
            raise UnsafeFile(f"cpi: cached probe of {task!r} (delete it to probe again): {e}") from None
        except UserError as e:
            cached, why = None, str(e).removeprefix(f"file {path} ")
        if why is None:
            weights = cached.get("weights") if isinstance(cached, dict) else None
            if not (isinstance(weights, dict) and isinstance(cached.get("trained_tokens"), int)):
                why = "not a probe ({'weights': {name: tensor}, 'trained_tokens': int})"
            elif not all(isinstance(weights.get(n), Tensor) and weights[n].shape == shape for n, shape in expected.items()):
                why = "its parameters or shapes are not this model's"
            elif not all(isinstance(t, Tensor) and all_finite(t) for t in weights.values()):
                why = "its weights are not finite"
        if why is None:
            return cached
        self.ctx.info(f"cpi: ignored the cached probe of {task!r} {path}: {why}; probing again and replacing it")
        return None

    def probe_key(self, task: str) -> str:
        """Content key: the run's model, data and batch settings (the context's fingerprint) and the probe's own."""
        h = hashlib.sha256(self.ctx.fingerprint(task).encode())
        h.update(repr((self.cfg.probe_steps, self.cfg.probe_lr)).encode())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["groups"] != self.groups:
            raise UserError(f"resume: the checkpoint's CPI groups {state['groups']} differ from this run's {self.groups}")
