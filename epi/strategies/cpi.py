"""`strategy=cpi`: Core Parameter Isolation Fine-Tuning (Wang, Liang, Peng, EMNLP 2025).

The whole pipeline runs in `prepare`, before the trainer's loop:
1. probe    from theta0, fine-tune a copy on each task alone (`probe_steps`, `probe_lr`); cached
            by a content key (model, task data, probe settings), so a sweep over p, tau, omega
            or the order reuses the probes
2. cores    per task, the top-p coordinates by |theta_i - theta0| (one global ranking by default)
3. groups   Jaccard overlap of the cores; tasks with overlap >= tau are linked; groups are the
            connected components; stage order random (seeded), given, or heuristic
4. fuse     transplant each task's core values, SLERP the task models elsewhere (epi/merge.py)
and returns one stage per group. The trainer then trains the stages in order; at the start of
stage k the cores of all tasks of groups 1..k-1 are frozen through the isolation engine. What a
stage trains on is `stage_data`: `mixed` (every task, equal weight: the paper's "pipelined SFT on
mixed-task data", where the groups decide only when cores freeze) or `group` (the group's tasks
alone: the classic multi-stage reading, and sequential A-then-B training).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from epi.data.format import collate
from epi.data.mixture import MixtureSampler
from epi.checkpoint import load_tensors
from epi.errors import TrainingDiverged, UserError
from epi.masks import SCOPES, Masks, NonFiniteScores, jaccard, mask_stats, participating, top_p, union
from epi.merge import SPACES, fuse
from epi.strategies.base import Stage, Strategy

if TYPE_CHECKING:
    from epi.trainer import Trainer

ORDERS = ("random", "given", "heuristic")
STAGE_DATA = ("mixed", "group")


# ---------------------------------------------------------------- pure steps of the pipeline
def core_regions(base: dict[str, Tensor], tuned: dict[str, Tensor], p: float, scope: str = "global") -> Masks:
    """C_i: the top-p coordinates by update magnitude |theta_i - theta0| (exact ranking)."""
    return top_p({n: (tuned[n].float() - base[n].float()).abs() for n in base}, p, scope=scope, method="exact")


def overlap_matrix(cores: dict[str, Masks]) -> list[list[float]]:
    names = list(cores)
    return [[jaccard(cores[a], cores[b]) for b in names] for a in names]


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


# ---------------------------------------------------------------- the strategy
class CPI(Strategy):
    fuse_models = True
    freeze_cores = True

    def __init__(
        self,
        p: float = 0.01,
        tau: float = 0.1,
        omega: float = 0.5,
        eps: float = 1e-4,
        space: str = "task_vector",
        order: str = "random",
        given_order: list[str] | None = None,
        stage_steps: int | None = None,
        stage_data: str = "mixed",
        probe_steps: int = 100,
        probe_lr: float = 1e-3,
        scope: str = "global",
        include: dict[str, bool] | None = None,
        cache_dir: str = ".cache/epi/probes",
    ):
        if not 0 < p <= 1:
            raise UserError(f"strategy.p={p!r}: must be in (0, 1], the fraction of coordinates in a task's core (e.g. 0.01)")
        if not tau >= 0:
            raise UserError(f"strategy.tau={tau!r}: must be >= 0 (Jaccard threshold linking two tasks; the paper uses 0.1)")
        if not 0 <= omega <= 1:
            raise UserError(f"strategy.omega={omega!r}: must be in [0, 1] (0 = base, 1 = merged task models)")
        if not eps > 0:
            raise UserError(f"strategy.eps={eps!r}: must be > 0 (colinear threshold of SLERP)")
        choices = (("space", space, SPACES), ("order", order, ORDERS), ("scope", scope, SCOPES), ("stage_data", stage_data, STAGE_DATA))
        for key, value, valid in choices:
            if value not in valid:
                raise UserError(f"strategy.{key}={value!r}: must be one of {list(valid)}")
        for key, value in (("probe_steps", probe_steps), ("stage_steps", stage_steps if stage_steps is not None else 1)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"strategy.{key}={value!r}: must be a positive integer")
        if not probe_lr > 0:
            raise UserError(f"strategy.probe_lr={probe_lr!r}: must be > 0")
        if order == "given" and not given_order:
            raise UserError("strategy.order=given needs strategy.given_order=[task, ...]")
        self.p, self.tau, self.omega, self.eps, self.space = p, tau, omega, eps, space
        self.order, self.given_order, self.stage_steps = order, list(given_order or []), stage_steps
        self.stage_data = stage_data
        self.probe_steps, self.probe_lr, self.scope = probe_steps, probe_lr, scope
        self.include, self.cache_dir = dict(include or {}), Path(cache_dir)
        self.cores: dict[str, Masks] = {}
        self.groups: list[list[str]] = []

    def prepare(self, trainer: Trainer, stages: list[Stage]) -> list[Stage]:
        super().prepare(trainer, stages)
        tasks = list(trainer.tasks)
        if self.order == "given" and sorted(self.given_order) != sorted(tasks):
            raise UserError(f"strategy.given_order={self.given_order}: must list each task of data.tasks={tasks} once")
        try:
            names = list(participating(trainer.named_params, self.include))  # model order: ties in |delta| break the same way in every process
        except ValueError as e:
            raise UserError(f"strategy.include: {e}") from e
        base = {n: p.detach().clone() for n, p in trainer.model.state_dict().items()}
        tuned = {task: self.probe(trainer, task) for task in tasks}
        try:
            self.cores = {
                task: core_regions({n: base[n] for n in names}, tuned[task], self.p, self.scope) for task in tasks
            }
        except NonFiniteScores as e:
            raise TrainingDiverged(
                f"cpi: a probe diverged (its update {e}); lower strategy.probe_lr (now {self.probe_lr:g})"
            ) from e
        overlap = overlap_matrix(self.cores)
        mass = {t: sum(float((tuned[t][n] - base[n]).abs()[m].sum()) for n, m in self.cores[t].items()) for t in tasks}
        self.groups = order_groups(
            connected_groups(tasks, overlap, self.tau), self.order, seed=trainer.cfg.seed, given=self.given_order, mass=mass
        )
        self._report(tasks, overlap)
        if self.freeze_cores and len(self.groups) == 1:
            print(f"cpi: all tasks form one group at tau={self.tau}, so no cores are frozen: after fusion this run is plain SFT")
        if self.fuse_models:
            fused, paths = fuse(base, tuned, self.cores, omega=self.omega, eps=self.eps, space=self.space)
            trainer.model.load_state_dict(fused)
            self._write("fusion_paths.json", paths)
            totals = {k: sum(v[k] for v in paths.values()) for k in ("slerp", "linear", "zero")}
            trainer.logger.log(0, "cpi", {f"fusion_{k}": v for k, v in totals.items()})
        steps = self.stage_steps or max(1, trainer.cfg.schedule.steps // len(self.groups))
        return [Stage(f"group{i}", tuple(g if self.stage_data == "group" else tasks), steps) for i, g in enumerate(self.groups)]

    def on_stage_start(self, stage: Stage, step: int) -> None:
        if not self.freeze_cores:
            return
        index = self.trainer.stages.index(stage)  # stage k of the plan `prepare` returned: group k
        earlier = [self.cores[t] for g in self.groups[:index] for t in g]
        frozen = union(*earlier) if earlier else {}
        self.trainer.optimizer.set_masks({n: m.to(self.trainer.device) for n, m in frozen.items()})
        numels = {n: p.numel() for n, p in self.trainer.named_params.items()}
        self.trainer.logger.log(step, "mask", {"isolated_fraction": mask_stats(frozen, numels)["isolated_fraction"], "stage": index})

    # ------------------------------------------------------------ probes
    def probe(self, trainer: Trainer, task: str) -> dict[str, Tensor]:
        """theta_i: a copy of theta0 fine-tuned on `task` alone; loaded from the cache when the same probe ran before."""
        key = self.probe_key(trainer, task)
        path = self.cache_dir / f"{key}.pt"
        if path.is_file():
            trainer.logger.log(0, "cpi", {"probe_cache_hit": 1.0}, task=task)
            print(f"cpi: probe of {task!r} from cache {path}")
            return load_tensors(path, f"cpi: cached probe of {task!r} (delete it to probe again):")
        trainer.logger.log(0, "cpi", {"probe_cache_hit": 0.0}, task=task)
        model = copy.deepcopy(trainer.model).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.probe_lr, weight_decay=0.0)
        rows = trainer.train_sets[task]
        sampler = MixtureSampler({task: len(rows)}, {task: 1.0}, seed=trainer.cfg.seed)
        for step in range(1, self.probe_steps + 1):
            batch = collate([rows[i] for _, i in sampler.next_batch(trainer.cfg.schedule.batch_size)], trainer.tokenizer.pad_token_id)
            loss = model(**{k: v.to(trainer.device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == self.probe_steps:
                trainer.logger.log(0, "cpi", {"probe_final_loss": loss.item()}, task=task)
        tuned = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # data-parallel ranks probe too: no shared temp file
        torch.save(tuned, tmp)
        tmp.replace(path)
        return tuned

    def probe_key(self, trainer: Trainer, task: str) -> str:
        """Content key: model config and initial weights, the task's training data, the probe settings."""
        h = hashlib.sha256()
        h.update(json.dumps(OmegaConf.to_container(trainer.cfg.model, resolve=True), sort_keys=True).encode())
        for name, tensor in trainer.model.state_dict().items():  # theta0 itself, not just how it was made
            h.update(name.encode())
            h.update(tensor.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
            h.update(str(float(tensor.float().sum())).encode())
        for row in trainer.train_sets[task]:
            h.update(bytes(str(row["input_ids"]), "utf-8"))
        settings = (self.probe_steps, self.probe_lr, trainer.cfg.schedule.batch_size, trainer.cfg.seed)
        h.update(repr(settings).encode())
        return f"{task}-{h.hexdigest()[:16]}"

    # ------------------------------------------------------------ artefacts
    def _report(self, tasks: list[str], overlap: list[list[float]]) -> None:
        logger = self.trainer.logger
        self._write("overlap.json", {"tasks": tasks, "jaccard": overlap})
        self._write("groups.json", {"tau": self.tau, "order": self.order, "groups": self.groups})
        logger.table("cpi/overlap", ["task", *tasks], [[t, *row] for t, row in zip(tasks, overlap)])
        logger.table("cpi/groups", ["stage", "tasks"], [[i, ", ".join(g)] for i, g in enumerate(self.groups)])
        logger.log(0, "cpi", {"groups": float(len(self.groups))})
        if self.trainer.rank == 0:
            from epi.plots import plot_overlap

            image = plot_overlap(tasks, overlap, self.trainer.run_dir / "cpi" / "overlap.png")
            logger.image("cpi/overlap_heatmap", image)
        print("cpi: groups in stage order:", self.groups)

    def _write(self, name: str, obj: Any) -> None:
        if self.trainer.rank != 0:
            return
        out = self.trainer.run_dir / "cpi"
        out.mkdir(exist_ok=True)
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["groups"] != self.groups:
            raise UserError(f"resume: the checkpoint's CPI groups {state['groups']} differ from this run's {self.groups}")
