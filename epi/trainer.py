"""The training loop. `Trainer` builds a run in named `_setup_*` steps; `fit` runs the stages; `train_step` is one step.

Order inside every step (the strategy hooks are the only extension points):
draw the global batch -> forward/backward per micro-batch (token-weighted) -> finite check ->
strategy.after_backward -> clip -> optimizer.step (isolated coordinates held bit-exactly) ->
LR schedule -> strategy.after_step -> log / eval / stage close / checkpoint.

Strategies never see the `Trainer`: they get a `TrainerContext` (the `Context` protocol of
`epi.strategies.base`), and a strategy that trains a copy of the model (CPI's probes) does it
through `train_step` too, so clipping, accumulation, precision and data parallelism are the same.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from epi import checkpoint, retention, rundir
from epi.components import build
from epi.context import TrainerContext
from epi.data.contamination import contamination, contamination_warning
from epi.data.format import IGNORE_INDEX, collate
from epi.data.load import encode_tasks, load_tasks
from epi.data.mixture import MixtureSampler, sampling_weights
from epi.distributed import init_distributed, pick_device, precision_warning, seed_everything
from epi.errors import TrainingDiverged, UserError
from epi.evaluate import average, evaluate, generation_limits
from epi.loss import CausalLMLoss, trained_tokens
from epi.masks import all_finite
from epi.models import build_model
from epi.optim import IsolatedOptimizer, clip_coefficient
from epi.schedules import constant
from epi.sharding import Shards, full_state_dict, grad_norm, local, shard, unsharded_root
from epi.strategies import Stage, Strategy, build_strategy
from epi.task_split import RowSplit, Layers, linear_layers, rows_unavailable, split_by_rows


def default_stages(cfg: DictConfig) -> list[Stage]:
    """`schedule.stages` if given (sequential training), else one stage over the whole mixture."""
    weights = dict(cfg.data.weights or {})
    if not cfg.schedule.stages:
        return [Stage("mix", tuple(cfg.data.tasks), cfg.schedule.steps, weights)]
    return [
        Stage(s.get("name", f"stage{i}"), tuple(s.tasks), s.steps, {t: weights.get(t, 1.0) for t in s.tasks})
        for i, s in enumerate(cfg.schedule.stages)
    ]


def format_stats(stats: dict[str, dict[str, int]], data: DictConfig) -> str:
    """One line per task: training examples and tokens after fitting data.max_len, and what that cost."""
    lines = [f"data (max_len={data.max_len}, truncate={data.truncate}):"]
    for task, s in stats.items():
        lines.append(
            f"  {task}: {s['examples']} train examples, {s['tokens']} tokens ({s['trained_tokens']} trained); "
            f"{s['truncated']} truncated, {s['dropped']} dropped; val/test dropped {s['val_dropped']}/{s['test_dropped']}"
        )
    return "\n".join(lines)


def param_groups(named_params: dict[str, torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Matrices decay; norms and biases do not."""
    return [
        {"params": [p for p in named_params.values() if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in named_params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class StepResult:
    loss: float  # the global batch's mean loss per trained token
    grad_norm: Tensor | float  # the clipped-over norm (isolated coordinates excluded); a tensor until logged
    lr: float  # the learning rate this step applied
    tokens: int  # tokens in the global batch, padding excluded
    trained_tokens: int  # of which carry loss


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward of a step."""

    batch: dict[str, Tensor] | None  # this rank's rows, collated; None when it has none
    tasks: frozenset[str]  # the tasks of its rows
    split: RowSplit | None = None  # task_split=rows: the layers split by task and each task's rows in `batch`


@dataclass
class Learner:
    """A model in training and everything one `train_step` advances: the run's own, or a copy a strategy trains."""

    name: str  # "run", or e.g. "a copy trained on 'math'": what a divergence message names
    model: torch.nn.Module
    forward: torch.nn.Module  # the model's summed loss (`CausalLMLoss`), or its DistributedDataParallel wrapper
    named_params: dict[str, torch.nn.Parameter]
    optimizer: IsolatedOptimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    sampler: MixtureSampler
    realised: dict[str, dict[str, int]]  # examples and tokens drawn per task
    horizon: int = 0  # the last step of the current sampler weights: length-grouped pools end there


PREDICTION_SAMPLE = 10  # predictions per task in the W&B table
NO_HOOKS = Strategy()  # a copy a strategy trains runs the step without any strategy's hooks


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_state: dict[str, Any] | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.compute = {"optimizer_steps": 0, "trained_tokens": 0}  # what the run consumed, probes included
        self._setup_strategy()
        self._setup_distributed()
        self._setup_data()
        self._setup_model()
        self._setup_tokenized_data()
        self._setup_optimizer()
        self._setup_logger(replaying=resume_state is not None)
        self._setup_retention(measure=resume_state is None)
        ctx = TrainerContext(
            model=self.model, engine=self.optimizer, logger=self.logger, run_dir=self.run_dir, tasks=tuple(self.tasks),
            seed=cfg.seed, rank=self.rank, world=self.world, steps=cfg.schedule.steps,
            train_copy=self.train_copy, fingerprint=self.fingerprint, charge=self.charge, task_gradient=self.task_gradient,
        )
        self.stages = self.strategy.prepare(ctx, default_stages(cfg))
        self._setup_lr_schedule()
        # task_split=rows, per set of parameters with exclusive coordinates: why it cannot run, or the layers it splits
        self._rows_plan: dict[frozenset[str], str | Layers] = {}
        self.step = 0
        self.skipped = 0  # updates dropped for a non-finite loss or gradient (schedule.nonfinite=skip)
        self.last_checkpoint: int | None = None  # step of the newest checkpoint this run wrote
        self._evaluated: tuple[int, dict, list] | None = None  # (step, results, predictions) of the last evaluation
        if resume_state is not None:
            self._load(resume_state)
            self.logger.muted = False  # from here on, the events are new

    # ---------------------------------------------------------------- setup, in order
    def _setup_strategy(self) -> None:
        """Built first: its keys and its stage plan are checked before anything is written."""
        self.strategy: Strategy = build_strategy(self.cfg.strategy)
        self.strategy.check_plan(default_stages(self.cfg))

    def _setup_distributed(self) -> None:
        seed_everything(self.cfg.seed)
        self.device = pick_device(self.cfg.device)
        self.rank, self.world = init_distributed(self.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        # parallel=fsdp on several ranks: the model is sharded (epi/sharding.py); `root` is the sharded loss module,
        # whose own parameters evaluation gathers (`unsharded_root`). One process trains unsharded either way.
        self.sharded = self.cfg.parallel.name == "fsdp" and self.world > 1
        self.root: torch.nn.Module | None = None
        if self.cfg.schedule.batch_size % self.world:
            raise UserError(f"schedule.batch_size={self.cfg.schedule.batch_size} must be divisible by the number of processes ({self.world})")
        if self.rank == 0 and (warning := precision_warning(self.device, self.cfg.schedule.precision)):
            print(warning, file=sys.stderr)

    def _setup_data(self) -> None:
        """The tasks with their splits; before the model, so a bad dataset fails before a slow model load."""
        self.raw_tasks = load_tasks(self.cfg.data)

    def _setup_model(self) -> None:
        self.model, self.tokenizer = build_model(self.cfg.model)
        self.model.to(self.device)
        vocab = self.model.get_output_embeddings().out_features
        CausalLMLoss(self.model, self.cfg.schedule.lm_head).check(vocab, self.device)

    def _setup_tokenized_data(self) -> None:
        """Training rows fitted to max_len, eval splits filtered alike, and what that cost (printed and logged at step 0)."""
        cfg = self.cfg
        encoded = encode_tasks(self.tokenizer, self.raw_tasks, cfg.data)
        self.tasks = {name: e.task for name, e in encoded.items()}  # eval splits without what max_len cannot hold
        self.train_sets = {name: e.rows for name, e in encoded.items()}
        self.longest_replies = {name: e.longest_reply for name, e in encoded.items()}  # eval.fit_generation's limits
        self.trained_counts = {name: [trained_tokens(r["labels"]) for r in rows] for name, rows in self.train_sets.items()}
        self.overlap = contamination(self.raw_tasks)  # eval prompts that are also training prompts
        self.data_stats = {name: {**e.stats, **e.task.input_stats, **self.overlap[name]} for name, e in encoded.items()}

    def _setup_retention(self, measure: bool) -> None:
        """Held-out text for general-ability retention (`eval.retention` passages; epi/retention.py), measured
        on the model as loaded: before a strategy's `prepare` changes it (CPI's fusion) and before any step."""
        n = self.cfg.eval.get("retention", 0)
        self.retention = retention.build(self.tokenizer, n, self.cfg.data.max_len) if n else None
        self.retention_before: dict[str, float] | None = None  # a resume restores it from the checkpoint
        if self.retention is not None and measure:
            self.retention_before = self.log_retention(0)

    def _setup_optimizer(self) -> None:
        """The run's learner: the optimizer config node wrapped by the isolation engine."""
        self.learner = self._new_learner("run", self.model, {t: 1.0 for t in self.tasks})

    def _setup_logger(self, replaying: bool) -> None:
        """metrics.jsonl (and W&B); muted while a resumed run rebuilds what its checkpoint's events already hold."""
        cfg = self.cfg
        make_logger = build(cfg.logger, "logger")
        self.logger = make_logger(
            self.run_dir if self.rank == 0 else None,  # one writer: rank 0
            mode=cfg.logger.mode if self.rank == 0 else "disabled",
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        self.logger.muted = replaying
        if self.rank == 0:
            print(format_stats(self.data_stats, cfg.data))
            if warning := contamination_warning(self.overlap, cfg.data.contamination_warn):
                print(warning)
        for task, stats in self.data_stats.items():
            self.logger.log(0, "data", stats, task=task)

    def _setup_lr_schedule(self) -> None:
        """After `prepare`: the schedule spans the steps of the strategy's plan."""
        self.total_steps = sum(stage.steps for stage in self.stages)
        self.learner.scheduler = build(self.cfg.lr_scheduler, "lr_scheduler")(self.optimizer.optimizer, total_steps=self.total_steps)

    def _new_learner(self, name: str, model: torch.nn.Module, weights: dict[str, float], **optimizer_args: Any) -> Learner:
        """A learner over `model`: DDP wrapper, the configured optimizer (`optimizer_args` override its keys)
        inside the isolation engine, and a mixture sampler seeded with the run's seed."""
        if self.sharded:
            forward = self._sharded_forward(name, model)
        else:
            loss = CausalLMLoss(model, self.cfg.schedule.lm_head, compile=self.cfg.schedule.compile)
            forward = torch.nn.parallel.DistributedDataParallel(loss) if self.world > 1 else loss
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}  # after sharding: DTensors under fsdp
        make_optimizer = build(self.cfg.optimizer, "optimizer")
        target = getattr(make_optimizer, "func", None)
        if not (inspect.isclass(target) and issubclass(target, torch.optim.Optimizer)) or issubclass(target, torch.optim.LBFGS):
            raise UserError(
                f"optimizer._target_={self.cfg.optimizer._target_!r}: the isolation engine holds isolated values around "
                "a plain torch.optim.Optimizer.step() built with _partial_: true; this is not one (or needs a closure "
                "per step, as LBFGS does)"
            )
        groups = param_groups(named, optimizer_args.pop("weight_decay", self.cfg.optimizer.get("weight_decay", 0.0)))
        inner = make_optimizer(groups, **optimizer_args)
        sizes = {task: len(rows) for task, rows in self.train_sets.items() if task in weights}
        lengths = {task: [len(r["input_ids"]) for r in self.train_sets[task]] for task in sizes}
        return Learner(
            name=name,
            model=model,
            forward=forward,
            named_params=named,
            optimizer=IsolatedOptimizer(inner, named, moments=self.cfg.isolation.moments,
                                        shards=Shards.of(named) if self.sharded else None),
            scheduler=None,
            sampler=MixtureSampler(sizes, weights, seed=self.cfg.seed, lengths=lengths),
            realised={task: {"examples": 0, "tokens": 0} for task in sizes},
        )

    def _sharded_forward(self, name: str, model: torch.nn.Module) -> torch.nn.Module:
        """parallel=fsdp: the run's loss module with the model sharded in it (`epi.sharding.shard`), built once; a
        later learner (a CPI probe, `train_copy`) trains the same sharded model, since no rank holds a whole copy."""
        if self.root is not None:
            if model is not self.model:
                raise RuntimeError(f"{name}: under parallel=fsdp a learner trains the run's sharded model, not a copy")
            return self.root
        p = self.cfg.parallel
        loss = CausalLMLoss(model, self.cfg.schedule.lm_head)
        shard(loss, model, p.mixed_precision, p.cpu_offload, p.reshard_after_forward)
        with torch.no_grad():  # FSDP2 sets up its state at the root's first forward, before any other forward
            self._backward_batch(loss, self._fallback_batch())
        self.root = loss
        return loss

    # the run's learner, as the loop and tests see it
    @property
    def named_params(self) -> dict[str, torch.nn.Parameter]:
        return self.learner.named_params

    @property
    def optimizer(self) -> IsolatedOptimizer:
        return self.learner.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self.learner.scheduler

    @property
    def sampler(self) -> MixtureSampler:
        return self.learner.sampler

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, dict[str, float]]:
        cfg, s = self.cfg, self.cfg.schedule
        with tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=self.rank != 0) as bar:  # closed before any error prints
            stage_end = 0
            for index, stage in enumerate(self.stages):
                stage_start, stage_end = stage_end, stage_end + stage.steps
                if self.step >= stage_end:
                    continue  # finished, closing work included, before a resume
                weights = {t: stage.weights.get(t, 1.0) if t in stage.tasks else 0.0 for t in self.tasks}
                self.sampler.set_weights(sampling_weights(self.sampler.sizes, weights, cfg.data.temperature))
                self.learner.horizon = stage_end
                if self.step == stage_start:
                    self.strategy.on_stage_start(index, stage, self.step)
                while self.step < stage_end:
                    self.step += 1
                    step, tic = self.step, time.perf_counter()
                    out = self.train_step(step)
                    seconds = time.perf_counter() - tic

                    bar.update(1)
                    bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{out.tokens / seconds:.0f}", stage=stage.name)
                    if s.log_every and step % s.log_every == 0:
                        self.logger.log(step, "train", {
                            "loss": out.loss, "grad_norm": float(out.grad_norm), "lr": out.lr,
                            "tokens_per_s": out.tokens / seconds, "trained_tokens": out.trained_tokens,
                            "skipped_steps": self.skipped,
                        })
                    if s.eval_every and step % s.eval_every == 0 and step < self.total_steps:
                        self.evaluate(step, cfg.eval.split)
                    if step == stage_end:  # before this step's checkpoint, so a resume never skips it
                        self.close_stage(index, stage)
                    if s.checkpoint_every and step % s.checkpoint_every == 0:
                        self.save_checkpoint()
        if self.last_checkpoint != self.step:
            self.save_checkpoint()
        self.logger.log(self.step, "compute", dict(self.compute))  # the run's cost, for equal-compute comparisons
        self.predictions: list[dict[str, Any]] = []
        results = self.evaluate(self.step, cfg.eval.split, self.predictions)
        if self.retention is not None:
            after = self.log_retention(self.step)
            self.write_retention(after)
        for task in self.tasks:  # a few predictions per task on the dashboard; all of them in predictions_<split>.jsonl
            rows = [[r["prompt"], r["reference"], r["prediction"], r["score"], r["loss"]] for r in self.predictions if r["task"] == task]
            self.logger.table(f"predictions/{task}", ["prompt", "reference", "prediction", "score", "loss"], rows[:PREDICTION_SAMPLE])
        self.save_model(self.run_dir / rundir.MODEL)
        self.logger.close()
        return results

    def close_stage(self, index: int, stage: Stage) -> None:
        """A stage's closing work: the strategy's hook, the realised mixture, the accuracy-matrix row."""
        self.strategy.on_stage_end(index, stage, self.step)
        self.log_realised()
        if len(self.stages) > 1:  # the accuracy matrix of sequential training: every task after every stage
            self.evaluate(self.step, f"{self.cfg.eval.split}/after_stage{index}")

    def train_step(self, step: int, learner: Learner | None = None, hooks: Strategy | None = None) -> StepResult:
        """One optimizer step of `learner` (the run's by default) with `hooks` at their fixed points
        (the run's strategy for the run's learner; none for a copy a strategy trains).

        The loss is token-weighted over the whole global batch: every micro-batch on every rank
        adds its summed token losses divided by the global batch's trained-token count, so
        `grad_accum=k` equals one k times larger batch and N ranks equal one process (DDP's
        gradient average is undone by the factor `world`).
        """
        if learner is None:
            learner, hooks = self.learner, self.strategy
        hooks = hooks or NO_HOOKS
        s = self.cfg.schedule
        learner.model.train()
        micro_batches, tokens, trained = self._draw_step(learner, step)
        self.charge(1, trained)  # every step of every learner, probes and skipped steps included
        loss_sum = torch.zeros((), device=self.device)
        for micro in micro_batches:
            with self._shielding(learner, micro):
                token_losses, counted = self._backward(learner, micro.batch, trained)
            if counted:
                loss_sum += token_losses.detach()  # stays on the device until the one check below
        if self.world > 1:
            dist.all_reduce(loss_sum)  # the logged loss is the global batch's, not this rank's shard's
        params = list(learner.named_params.values())
        raw_norm = grad_norm(params)
        loss, raw = (torch.stack([loss_sum / trained, raw_norm.float()])).tolist()  # the step's one host sync
        scheduler = learner.scheduler
        lr = scheduler.get_last_lr()[0]  # the lr this step applies
        if not (math.isfinite(loss) and math.isfinite(raw)):
            self._non_finite(learner, step, loss, raw, lr)
            learner.optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            hooks.after_step(step)
            return StepResult(loss, raw, lr, tokens, trained)

        hooks.after_backward(step)
        learner.optimizer.hide_isolated_grads()
        norm = grad_norm(params) if learner.optimizer.index else raw_norm  # the clip norm must not count isolated gradients
        if s.clip_norm:
            torch.nn.utils.clip_grads_with_norm_(params, s.clip_norm, norm)
        learner.optimizer.step(clip_coefficient(norm, s.clip_norm) if s.clip_norm else 1.0,
                               tasks=frozenset().union(*(micro.tasks for micro in micro_batches)))
        scheduler.step()
        learner.optimizer.zero_grad(set_to_none=True)
        hooks.after_step(step)
        return StepResult(loss, norm, lr, tokens, trained)

    def _non_finite(self, learner: Learner, step: int, loss: float, grad_norm: float, lr: float) -> None:
        """`schedule.nonfinite`: `stop` ends the run before the bad update; `skip` drops the update and counts it."""
        what = f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite"
        if learner is not self.learner:
            raise TrainingDiverged(f"{learner.name}, {what} at learning rate {lr:.3g}")  # its caller names the key to change
        self.logger.log(step, "nonfinite", {"loss": loss, "grad_norm": grad_norm})
        if self.cfg.schedule.nonfinite == "skip":
            self.skipped += 1
            if self.rank == 0:
                tqdm.write(f"{what}: update skipped ({self.skipped} so far; schedule.nonfinite=skip)")
            return
        self.logger.close()
        last = self._last_good()
        s = self.cfg.schedule
        raise TrainingDiverged(
            f"{what}; training diverged and was stopped before the update; {last}, and no model was saved. "
            f"Usual fixes: a lower optimizer.lr (now {self.cfg.optimizer.lr:g}, lr at this step {lr:.3g}), a longer schedule.warmup_steps "
            f"(now {s.warmup_steps}), schedule.clip_norm (now {s.clip_norm}), schedule.precision=fp32 (now {s.precision}); "
            "or schedule.nonfinite=skip to drop such updates and count them."
        )

    @contextmanager
    def _shielding(self, learner: Learner, micro: MicroBatch) -> Iterator[None]:
        """Around one micro-batch's backward under exclusive isolation: keep each task's gradient from the
        coordinates it does not own, per task's rows (`split_by_rows`) or around a one-task micro-batch."""
        engine = learner.optimizer
        if not engine.exclusive:
            yield
        elif micro.split is not None:
            with split_by_rows(micro.split, {task: engine.shielded(task) for task in micro.split.rows}):
                yield
        else:
            (task,) = micro.tasks
            engine.begin_task(task)
            yield
            engine.end_task(task)

    @property
    def _rows_why(self) -> dict[frozenset[str], str | None]:
        """Why `task_split=rows` could not run, per set of owned parameters it was asked for (None: it ran)."""
        return {owned: plan if isinstance(plan, str) else None for owned, plan in self._rows_plan.items()}

    def _row_layers(self, learner: Learner) -> Layers | None:
        """The layers `isolation.task_split=rows` splits for the coordinates owned now, or None where it is not
        asked for or cannot run; then it says why once (the micro-batch path gives the same to float rounding).
        Worked out once per set of owned parameters, not per step."""
        if self.cfg.isolation.task_split != "rows":
            return None
        owned = learner.optimizer.exclusive_params
        if owned not in self._rows_plan:
            model = learner.model
            flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
            why = rows_unavailable(model, set(owned), self.world, self.cfg.schedule.compile, bool(getattr(model, flag, False)),
                                   self.cfg.schedule.lm_head)
            if why and self.rank == 0 and not any(isinstance(plan, str) for plan in self._rows_plan.values()):
                tqdm.write(f"isolation.task_split=rows: {why}; exclusive isolation runs task-homogeneous micro-batches")
            self._rows_plan[owned] = why or linear_layers(model, set(owned))
        plan = self._rows_plan[owned]
        return None if isinstance(plan, str) else plan

    def _draw_step(self, learner: Learner, step: int) -> tuple[list[MicroBatch], int, int]:
        """This step's micro-batches (this rank's shards, with their tasks), and the global batch's tokens
        and trained tokens.

        The whole global batch (batch_size x grad_accum examples) is drawn at once, the same on every
        rank, so its trained-token count needs no communication and `grad_accum=k` sees exactly the
        examples of one batch k times as large. Under `schedule.group_by_length` the pool of
        length-grouped batches ends with the current weights (`learner.horizon`). Under exclusive
        isolation each task's gradient must be kept from the coordinates it does not own: with
        `isolation.task_split=rows` each micro-batch's rows are ordered by task (`MicroBatch.split`), else
        the same examples run as task-homogeneous micro-batches of at most batch_size (`_by_task`).
        """
        s = self.cfg.schedule
        group = min(s.group_by_length, learner.horizon - step + 1) if s.group_by_length else 0
        picks = learner.sampler.next_batch(s.batch_size * s.grad_accum, group)
        tokens = trained = 0
        for task, i in picks:
            row = self.train_sets[task][i]
            learner.realised[task]["examples"] += 1
            learner.realised[task]["tokens"] += len(row["input_ids"])
            tokens += len(row["input_ids"])
            trained += self.trained_counts[task][i]
        chunks = [picks[k * s.batch_size : (k + 1) * s.batch_size] for k in range(s.grad_accum)]
        if not learner.optimizer.exclusive:
            micro_batches = [MicroBatch(self._shard(self._rows(chunk)), frozenset(t for t, _ in chunk)) for chunk in chunks]
        elif (layers := self._row_layers(learner)) is not None:  # one process: the shard is the whole chunk
            micro_batches = []
            for chunk in chunks:
                chunk = sorted(chunk, key=lambda pick: pick[0])  # stable: each task's rows contiguous, in draw order
                rows, start = {}, 0
                for task, group in itertools.groupby(chunk, key=lambda pick: pick[0]):
                    stop = start + len(list(group))
                    rows[task], start = (start, stop), stop
                micro_batches.append(MicroBatch(self._shard(self._rows(chunk)), frozenset(rows), RowSplit(layers, rows)))
        else:
            micro_batches = [MicroBatch(self._shard(self._rows(chunk)), frozenset([task])) for task, chunk in self._by_task(picks, s.batch_size)]
        return micro_batches, tokens, trained

    def _rows(self, picks: list[tuple[str, int]]) -> list[dict[str, list[int]]]:
        return [self.train_sets[task][i] for task, i in picks]

    def _shard(self, rows: list[dict[str, list[int]]]) -> dict[str, Tensor] | None:
        """This rank's share of `rows`, collated on the device; None when it has none."""
        shard = rows[self.rank :: self.world]
        if not shard:
            return None
        return {name: v.to(self.device) for name, v in collate(shard, self.tokenizer.pad_token_id).items()}

    def _backward(self, learner: Learner, batch: dict[str, Tensor] | None, trained: int) -> tuple[Tensor, bool]:
        """Forward and token-weighted backward of one micro-batch: its summed token losses, and whether they
        count. A rank whose share is empty (`batch` None) runs a two-token batch with weight 0, because DDP
        all-reduces in every backward and the other ranks' backward would otherwise wait for it."""
        counted = batch is not None
        token_losses = self._backward_batch(learner.forward, batch if counted else self._fallback_batch())
        (token_losses * (self.world / trained if counted else 0.0)).backward()
        return token_losses, counted

    def _fallback_batch(self) -> dict[str, Tensor]:
        """Two pad tokens, one of them 'trained': a forward every rank can run when it has no rows of its own."""
        pad = self.tokenizer.pad_token_id
        return {k: v.to(self.device) for k, v in collate([{"input_ids": [pad, pad], "labels": [IGNORE_INDEX, pad]}], pad).items()}

    def _backward_batch(self, forward: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The summed token losses of one collated batch, under the run's precision."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.schedule.precision == "bf16" else nullcontext()
        with autocast:
            return forward(batch["input_ids"], batch["attention_mask"], batch["labels"])

    @staticmethod
    def _by_task(picks: list[tuple[str, int]], size: int) -> list[tuple[str, list[tuple[str, int]]]]:
        """The global batch as task-homogeneous micro-batches of at most `size` examples, tasks in sorted order."""
        chunks = []
        for task in sorted({t for t, _ in picks}):
            mine = [pick for pick in picks if pick[0] == task]
            chunks += [(task, mine[k : k + size]) for k in range(0, len(mine), size)]
        return chunks

    def log_realised(self) -> None:
        """The mixture as trained so far: examples and tokens drawn per task, and each task's share of the tokens."""
        realised = self.learner.realised
        total = sum(r["tokens"] for r in realised.values()) or 1
        for task, r in realised.items():
            self.logger.log(self.step, "mixture", {**r, "token_share": r["tokens"] / total}, task=task)
        if self.rank == 0:
            shares = (f"{t} {r['examples']} ex / {r['tokens']} tok ({r['tokens'] / total:.0%})" for t, r in realised.items())
            tqdm.write(f"realised mixture at step {self.step}: " + ", ".join(shares))

    # ---------------------------------------------------------------- for strategies (through the context)
    def train_copy(self, task: str, steps: int, lr: float) -> tuple[dict[str, Tensor], int, float]:
        """A copy of the model trained on `task` alone with `train_step` (no weight decay, constant lr):
        its weights, the trained tokens it consumed (counted in the run's compute too) and its last loss.

        Under parallel=fsdp no rank can hold a whole copy: the run's own sharded model trains with a fresh
        optimizer and sampler, its tuned shards (this rank's, by parameter name) are returned, and its
        weights are put back bit for bit."""
        if self.sharded:
            theta0 = {n: local(p).detach().clone() for n, p in self.named_params.items()}
            try:
                return self._train(self.model, task, steps, lr, lambda: {n: local(p).detach().cpu().clone() for n, p in self.named_params.items()})
            finally:
                with torch.no_grad():
                    for n, p in self.named_params.items():
                        local(p).copy_(theta0[n])
        model = copy.deepcopy(self.model)
        return self._train(model, task, steps, lr, lambda: {n: t.detach().cpu().clone() for n, t in model.state_dict().items()})

    def _train(self, model: torch.nn.Module, task: str, steps: int, lr: float,
               weights: Callable[[], dict[str, Tensor]]) -> tuple[dict[str, Tensor], int, float]:
        learner = self._new_learner(f"a copy trained on {task!r}", model, {task: 1.0}, lr=lr, weight_decay=0.0)
        learner.scheduler = constant(learner.optimizer.optimizer, total_steps=steps)
        learner.horizon = steps
        tokens = 0
        for step in range(1, steps + 1):
            out = self.train_step(step, learner)
            tokens += out.trained_tokens
        return weights(), tokens, out.loss

    def task_gradient(self, task: str, step: int, draw: int = 0) -> dict[str, Tensor]:
        """The gradient of the loss on a calibration batch of `task` alone at the run's current weights, with no
        update: batch_size examples drawn by `default_rng([seed, 3, step, task index, draw])` (a pure function,
        so a resume draws the same), token-weighted and sharded like a training step. Its tokens are charged."""
        learner, s = self.learner, self.cfg.schedule
        if any(p.grad is not None for p in learner.named_params.values()):
            raise RuntimeError("task_gradient needs the gradients cleared: call it from after_step")
        rows = self.train_sets[task]
        rng = np.random.default_rng([self.cfg.seed, 3, step, sorted(self.train_sets).index(task), draw])
        picks = [int(i) for i in rng.choice(len(rows), size=min(s.batch_size, len(rows)), replace=False)]
        trained = sum(self.trained_counts[task][i] for i in picks)
        self.charge(0, trained)
        with torch.enable_grad():  # strategies call this from their no-grad refresh
            self._backward(learner, self._shard([rows[i] for i in picks]), trained)
        # the gradients themselves, not copies: zero_grad(set_to_none) only drops the parameters' references to them
        grads = {n: torch.zeros_like(local(p)) if p.grad is None else local(p.grad).detach()  # local shards under fsdp
                 for n, p in learner.named_params.items()}
        learner.optimizer.zero_grad(set_to_none=True)
        return grads

    def charge(self, optimizer_steps: int, trained_tokens: int) -> None:
        """Compute the run consumed without spending it here (a probe read from the cache)."""
        self.compute["optimizer_steps"] += optimizer_steps
        self.compute["trained_tokens"] += trained_tokens

    def fingerprint(self, task: str) -> str:
        """A content key of what `train_copy(task, ...)` depends on besides its arguments."""
        h = hashlib.sha256()
        h.update(json.dumps(OmegaConf.to_container(self.cfg.model, resolve=True), sort_keys=True).encode())
        weights = self.model.state_dict() if not self.sharded else {n: local(p) for n, p in self.named_params.items()}
        for name, tensor in weights.items():  # theta0 itself (this rank's shards under fsdp), not just how it was made
            h.update(name.encode())
            h.update(tensor.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
            h.update(str(float(tensor.float().sum())).encode())
        if self.sharded:  # one key on every rank, for the set of shards: each rank's digest, in rank order
            digests = [None] * self.world
            dist.all_gather_object(digests, h.hexdigest())
            h = hashlib.sha256(repr(("fsdp", self.world, digests)).encode())
        for row in self.train_sets[task]:
            h.update(bytes(str(row["input_ids"]), "utf-8"))
        s = self.cfg.schedule
        optimizer = OmegaConf.to_container(self.cfg.optimizer, resolve=True)
        h.update(repr((s.batch_size, s.grad_accum, s.group_by_length, s.precision, s.lm_head, s.clip_norm, self.cfg.seed, optimizer)).encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- eval, save, resume
    def evaluate(self, step: int, split_name: str, predictions: list[dict[str, Any]] | None = None) -> dict[str, dict[str, float]]:
        """Every task on `eval.split`, logged under `split_name`; `predictions` receives one record per example.
        Generation per task stops at its longest training reply (`generation_limits`, eval.fit_generation).

        The weights change only with a step, so a second evaluation at the same step (the final one
        right after the last stage's) reuses the first instead of generating everything again.
        """
        if self._evaluated is not None and self._evaluated[0] == step:
            results, records = self._evaluated[1], self._evaluated[2]
        else:
            e, records = self.cfg.eval, []
            with unsharded_root(self.root):
                results = evaluate(
                    self.model,
                    self.tokenizer,
                    self.tasks,
                    split=e.split,
                    n_examples=e.n_examples,
                    batch_size=e.batch_size,
                    max_new_tokens=generation_limits(self.longest_replies, e.max_new_tokens, e.fit_generation),
                    max_len=self.cfg.data.max_len,
                    truncate=self.cfg.data.truncate,
                    predictions=records,
                )
            self._evaluated = (step, results, records)
        if predictions is not None:
            predictions += records
        for task, metrics in results.items():
            self.logger.log(step, split_name, metrics, task=task)
        self.logger.log(step, split_name, {f"avg_{k}": v for k, v in average(results).items()})
        return results

    def log_retention(self, step: int) -> dict[str, float]:
        """Perplexity of the held-out text now, logged under `retention` at `step`."""
        with unsharded_root(self.root):
            metrics = retention.perplexity(self.model, self.retention, self.cfg.eval.batch_size)
        self.logger.log(step, "retention", metrics)
        return metrics

    def write_retention(self, after: dict[str, float]) -> None:
        """retention.json: the corpus (by hash), and its perplexity before and after training."""
        if self.rank != 0:
            return
        data = {
            "corpus_sha256": self.retention.corpus_sha256, "passages": len(self.retention.passages),
            "tokens_per_passage": self.cfg.data.max_len, "before": self.retention_before, "after": after,
        }
        (self.run_dir / rundir.RETENTION).write_text(json.dumps(data, indent=2) + "\n")

    def save_model(self, path: Path) -> None:
        """The final model in Hugging Face format, written to a temporary directory and renamed into place.
        Under parallel=fsdp every rank takes part in gathering the whole state dict; rank 0 writes it."""
        state = full_state_dict(self.model) if self.sharded else self.model.state_dict()
        if self.rank != 0:
            return

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, state_dict=state)
            self.tokenizer.save_pretrained(tmp)

        checkpoint.write_atomically(path, write, checkpoint.nbytes(state), "model")

    def save_checkpoint(self) -> None:
        """Everything the rest of the run depends on, in types `torch.load(weights_only=True)` accepts.
        Under parallel=fsdp the model, optimizer, masks, strategy state and RNG are saved per rank first
        (`checkpoint.save_shards`), and `checkpoint.pt` names their directory. Weights that are not finite are never
        saved: a checkpoint is what a divergence message calls the last good one."""
        self._check_finite_weights()
        self.last_checkpoint = self.step
        if self.sharded:
            own = {"engine": self._engine_state(), "strategy": self.strategy.state_dict(), "rng": checkpoint.rng_state()}
            tensors = {"shards": {"world": self.world,
                                  "dir": checkpoint.save_shards(self.run_dir, self.step, self.model, self.optimizer.optimizer, own)}}
        else:
            tensors = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "strategy": self.strategy.state_dict(), "rng": checkpoint.rng_state()}
        if self.rank != 0:
            return
        checkpoint.save(
            self.run_dir / rundir.CHECKPOINT,
            {
                "step": self.step,
                **tensors,
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "realised": self.learner.realised,
                "skipped": self.skipped,
                "compute": self.compute,
                "retention_before": self.retention_before,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "metrics_lines": self.logger.lines,  # metrics.jsonl up to here belongs to this state
            },
        )
        if self.sharded:
            checkpoint.prune_shards(self.run_dir, keep=tensors["shards"]["dir"])

    def _check_finite_weights(self) -> None:
        """Stops the run (exit 3) when an update left a weight NaN or inf with a finite loss and gradient norm (an lr
        far too large does that in one step): the checkpoint on disk stays the last good one."""
        finite = torch.tensor(float(all(all_finite(local(p).detach()) for p in self.named_params.values())), device=self.device)
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # a rank's shard alone may hold the bad values
        if finite.item() == 1.0:
            return
        self.logger.close()
        s, last = self.cfg.schedule, self._last_good()
        raise TrainingDiverged(
            f"step {self.step}: the weights are not finite after the update (its loss and gradient norm were finite: an "
            f"update too large); training was stopped and this state was not saved; {last}, and no model was saved. "
            f"Usual fixes: a lower optimizer.lr (now {self.cfg.optimizer.lr:g}), a longer schedule.warmup_steps (now {s.warmup_steps}), "
            f"schedule.clip_norm (now {s.clip_norm})."
        )

    def _last_good(self) -> str:
        """Where a stopped run can resume from, for the line that stops it."""
        if self.last_checkpoint is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint is {self.run_dir / rundir.CHECKPOINT} (step {self.last_checkpoint})"

    def _engine_state(self) -> dict[str, Any]:
        """The isolation engine's own state (masks of this rank's shards) without the inner optimizer's, which DCP saves."""
        return {k: v for k, v in self.optimizer.state_dict().items() if k != "optimizer"}

    def _load(self, state: dict[str, Any]) -> None:
        if "shards" in state:
            if not self.sharded:
                raise UserError(f"{state['source']}: a parallel=fsdp checkpoint of {state['shards']['world']} ranks; "
                                f"resume it under torchrun with --nproc_per_node={state['shards']['world']} parallel=fsdp")
            own = checkpoint.load_shards(Path(state["source"]), state, self.model, self.optimizer.optimizer)
            self.optimizer.load_state_dict(own["engine"])
            state = {**state, "strategy": own["strategy"], "rng": own["rng"]}
        elif self.sharded:
            raise UserError(f"{state['source']}: a checkpoint of an unsharded run; resume it with parallel=ddp")
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.learner.realised = state["realised"]
        self.skipped = state["skipped"]
        self.compute = state["compute"]
        self.retention_before = state.get("retention_before")  # absent from checkpoints written before eval.retention
        self.strategy.load_state_dict(state["strategy"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
