"""One optimizer step, and the learners it steps: the run's model or a copy a strategy trains.

`Stepper.train_step` is the step, in this order (the strategy hooks are its only extension points):
draw the global batch -> forward/backward per micro-batch (token-weighted; under exclusive isolation each
task's gradient shielded from the coordinates it does not own) -> finite check -> strategy.after_backward ->
clip (isolated coordinates not counted) -> optimizer.step (isolated coordinates held bit-exactly) -> LR
schedule -> strategy.after_step. The stepper also owns drawing and sharding the batch, the non-finite policy
(`schedule.nonfinite`) and the compute counter (`charge`), so a copy a strategy trains (CPI's probes) steps
exactly as the run does: same clipping, accumulation, precision and data parallelism.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from epi.components import build
from epi.config import RunConfig
from epi.data.format import IGNORE_INDEX, collate, pack, packed_layout, plan_rows
from epi.data.mixture import MixtureSampler
from epi.errors import TrainingDiverged, UserError
from epi.logging import RunLogger
from epi.loss import CausalLMLoss
from epi.optim import IsolatedOptimizer, clip_coefficient
from epi.sharding import Shards, grad_norm, shard
from epi.strategies import Strategy
from epi.task_split import Layers, RowSplit, linear_layers, rows_unavailable, split_by_rows

RUN = "run"  # the run's own learner; any other is a copy a strategy trains
NO_HOOKS = Strategy()  # a copy a strategy trains runs the step without any strategy's hooks


class NonFiniteUpdate(TrainingDiverged):
    """The run's step had a NaN/inf loss or gradient norm under schedule.nonfinite=stop: the update was not made.
    The trainer, which knows the last good checkpoint, turns it into the line that stops the run."""

    def __init__(self, what: str, lr: float):
        super().__init__(what)
        self.what, self.lr = what, lr


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
    cells: int  # the global batch's rows x width over every micro-batch and rank, padding included


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward of a step."""

    batch: dict[str, Tensor] | None  # this rank's rows, collated; None when it has none
    tasks: frozenset[str]  # the tasks of its rows
    split: RowSplit | None = None  # task_split=rows: the layers split by task and each task's tokens in `batch`


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


class Stepper:
    """Steps learners of one run. Built once per run from what a step depends on; holds no loop state besides the
    compute counter, the count of skipped updates and, under parallel=fsdp, the sharded loss module (`root`)."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, pad_id: int, train_sets: dict[str, list[dict[str, list[int]]]],
                 trained_counts: dict[str, list[int]], device: torch.device, rank: int, world: int, sharded: bool):
        self.cfg, self.model, self.pad_id = cfg, model, pad_id
        self.train_sets, self.trained_counts = train_sets, trained_counts
        self.device, self.rank, self.world, self.sharded = device, rank, world, sharded
        self.root: torch.nn.Module | None = None  # parallel=fsdp on several ranks: the sharded loss module
        self.logger: RunLogger | None = None  # the run's, once it exists (a skipped update is logged)
        self.compute = {"optimizer_steps": 0, "trained_tokens": 0}  # what the run consumed, probes included
        self.skipped = 0  # updates dropped for a non-finite loss or gradient (schedule.nonfinite=skip)
        # task_split=rows, per set of parameters with exclusive coordinates: why it cannot run, or the layers it splits
        self._rows_plan: dict[frozenset[str], str | Layers] = {}

    def charge(self, optimizer_steps: int, trained_tokens: int) -> None:
        """Compute the run consumed, whether spent here or not (a probe read from the cache)."""
        self.compute["optimizer_steps"] += optimizer_steps
        self.compute["trained_tokens"] += trained_tokens

    def new_learner(self, name: str, model: torch.nn.Module, weights: dict[str, float], **optimizer_args: Any) -> Learner:
        """A learner over `model`: DDP wrapper, the configured optimizer (`optimizer_args` override its keys)
        inside the isolation engine, and a mixture sampler seeded with the run's seed."""
        if self.sharded:
            forward = self._sharded_forward(name, model)
        else:
            loss = CausalLMLoss(model, self.cfg.schedule.lm_head, compile=self.cfg.schedule.compile)
            forward = torch.nn.parallel.DistributedDataParallel(loss) if self.world > 1 else loss
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}  # after sharding: DTensors under fsdp
        make_optimizer = build(self.cfg.composed.optimizer, "optimizer")
        target = getattr(make_optimizer, "func", None)
        if not (inspect.isclass(target) and issubclass(target, torch.optim.Optimizer)) or issubclass(target, torch.optim.LBFGS):
            raise UserError(
                f"optimizer._target_={self.cfg.composed.optimizer._target_!r}: the isolation engine holds isolated values around "
                "a plain torch.optim.Optimizer.step() built with _partial_: true; this is not one (or needs a closure "
                "per step, as LBFGS does)"
            )
        groups = param_groups(named, optimizer_args.pop("weight_decay", self.cfg.optimizer.weight_decay))
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
            self.backward_batch(loss, self._fallback_batch())
        self.root = loss
        return loss

    def train_step(self, step: int, learner: Learner, hooks: Strategy | None = None) -> StepResult:
        """One optimizer step of `learner` with `hooks` at their fixed points (the run's strategy for the run's
        learner; none for a copy a strategy trains).

        The loss is token-weighted over the whole global batch: every micro-batch on every rank
        adds its summed token losses divided by the global batch's trained-token count, so
        `grad_accum=k` equals one k times larger batch and N ranks equal one process (DDP's
        gradient average is undone by the factor `world`).
        """
        hooks = hooks or NO_HOOKS
        s = self.cfg.schedule
        learner.model.train()
        micro_batches, tokens, trained = self.draw_step(learner, step)
        self.charge(1, trained)  # every step of every learner, probes and skipped steps included
        loss_sum = torch.zeros((), device=self.device)
        cells = sum(micro.batch["input_ids"].numel() for micro in micro_batches if micro.batch is not None)  # this rank's
        for micro in micro_batches:
            with self._shielding(learner, micro):
                token_losses, counted = self.backward(learner, micro.batch, trained)
            if counted:
                loss_sum += token_losses.detach()  # stays on the device until the one check below
        totals = torch.stack([loss_sum, loss_sum.new_full((), cells)])  # new_full: a kernel argument, no copy that syncs
        if self.world > 1:
            dist.all_reduce(totals)  # the logged loss and cells are the global batch's, not this rank's shard's
        params = list(learner.named_params.values())
        raw_norm = grad_norm(params)
        loss, raw, all_cells = (torch.stack([totals[0] / trained, raw_norm.float(), totals[1]])).tolist()  # the step's one host sync
        scheduler = learner.scheduler
        lr = scheduler.get_last_lr()[0]  # the lr this step applies
        if not (math.isfinite(loss) and math.isfinite(raw)):
            self._non_finite(learner, step, loss, raw, lr)
            learner.optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            hooks.after_step(step)
            return StepResult(loss, raw, lr, tokens, trained, round(all_cells))

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
        return StepResult(loss, norm, lr, tokens, trained, round(all_cells))

    def _non_finite(self, learner: Learner, step: int, loss: float, grad_norm: float, lr: float) -> None:
        """`schedule.nonfinite`: `stop` ends the run before the bad update (NonFiniteUpdate); `skip` drops the update
        and counts it. A copy a strategy trains always stops: its caller names the key to change."""
        what = f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite"
        if learner.name != RUN:
            raise TrainingDiverged(f"{learner.name}, {what} at learning rate {lr:.3g}")
        self.logger.log(step, "nonfinite", {"loss": loss, "grad_norm": grad_norm})
        if self.cfg.schedule.nonfinite == "skip":
            self.skipped += 1
            if self.rank == 0:
                tqdm.write(f"{what}: update skipped ({self.skipped} so far; schedule.nonfinite=skip)")
            return
        raise NonFiniteUpdate(what, lr)

    @contextmanager
    def _shielding(self, learner: Learner, micro: MicroBatch) -> Iterator[None]:
        """Around one micro-batch's backward under exclusive isolation: keep each task's gradient from the
        coordinates it does not own, per task's tokens (`split_by_rows`) or around a one-task micro-batch."""
        engine = learner.optimizer
        if not engine.exclusive:
            yield
        elif micro.split is not None:
            with split_by_rows(micro.split, engine.ownership(list(micro.split.tokens))):
                yield
        else:
            (task,) = micro.tasks
            engine.begin_task(task)
            yield
            engine.end_task(task)

    @property
    def rows_why(self) -> dict[frozenset[str], str | None]:
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

    def draw_step(self, learner: Learner, step: int) -> tuple[list[MicroBatch], int, int]:
        """This step's micro-batches (this rank's shards, with their tasks), and the global batch's tokens
        and trained tokens.

        The whole global batch (batch_size x grad_accum examples) is drawn at once, the same on every
        rank, so its trained-token count needs no communication and `grad_accum=k` sees exactly the
        examples of one batch k times as large. Under `schedule.group_by_length` the pool of
        length-grouped batches ends with the current weights (`learner.horizon`). Under exclusive
        isolation each task's gradient must be kept from the coordinates it does not own: with
        `isolation.task_split=rows` each micro-batch's examples are ordered by task and its backward split by
        each task's tokens (`MicroBatch.split`; packed rows mix the tasks), else
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
            micro_batches = [MicroBatch(self.shard(self._rows(chunk)), frozenset(t for t, _ in chunk)) for chunk in chunks]
        elif (layers := self._row_layers(learner)) is not None:  # one process: the shard is the whole chunk
            micro_batches = []
            for chunk in chunks:
                chunk = sorted(chunk, key=lambda pick: pick[0])  # stable: each task's rows contiguous, in draw order
                tasks = [task for task, _ in chunk]
                examples = self._rows(chunk)
                plan = self._plan(examples) if self.cfg.data.packing else None  # packed rows mix the tasks
                batch = self.shard(examples, plan)
                at, order = self._task_tokens(tasks, examples, plan, batch["input_ids"].shape[1])
                micro_batches.append(MicroBatch(batch, frozenset(at), RowSplit(layers, at, batch["input_ids"].numel(), order)))
        else:
            micro_batches = [MicroBatch(self.shard(self._rows(chunk)), frozenset([task])) for task, chunk in self._by_task(picks, s.batch_size)]
        return micro_batches, tokens, trained

    def _rows(self, picks: list[tuple[str, int]]) -> list[dict[str, list[int]]]:
        return [self.train_sets[task][i] for task, i in picks]

    def _plan(self, rows: list[dict[str, list[int]]]) -> list[list[int]]:
        """The packed rows of at most data.max_len tokens for `rows` (`plan_rows`)."""
        return plan_rows([len(x["input_ids"]) for x in rows], self.cfg.data.max_len)

    def _task_tokens(self, tasks: list[str], rows: list[dict[str, list[int]]], plan: list[list[int]] | None,
                     width: int) -> tuple[dict[str, slice], Tensor | None]:
        """Each task's tokens in the micro-batch's (rows x `width`) token grid flattened (`RowSplit`), tasks in sorted
        order (`tasks` is sorted). Padded: a task's examples are whole rows, one after another, a slice of the grid.
        Packed (`plan`): the spans its examples fill in rows that mix tasks (`packed_layout`), gathered task by task
        in `order`, each task a slice of that; the padding after a row's last example is in no task's (its tokens
        carry no gradient)."""
        if plan is None:
            return _consecutive({task: n * width for task, n in Counter(tasks).items()}), None
        spans: dict[str, list[Tensor]] = {task: [] for task in tasks}
        lengths = [len(x["input_ids"]) for x in rows]
        for r, start, i in packed_layout(plan, lengths):
            spans[tasks[i]].append(torch.arange(r * width + start, r * width + start + lengths[i]))
        order = torch.cat([span for parts in spans.values() for span in parts]).to(self.device)
        return _consecutive({task: sum(len(span) for span in parts) for task, parts in spans.items()}), order

    def shard(self, rows: list[dict[str, list[int]]], plan: list[list[int]] | None = None) -> dict[str, Tensor] | None:
        """This rank's share of `rows` on the device, padded (`collate`) or, under data.packing, packed (`pack`) by
        `plan` (given by a caller that needs it too, on one process where the share is all of `rows`) or by this
        share's own plan; None when it has none."""
        shard = rows[self.rank :: self.world]
        if not shard:
            return None
        if self.cfg.data.packing:
            batch = pack(shard, plan if plan is not None else self._plan(shard), self.pad_id)
        else:
            batch = collate(shard, self.pad_id)
        return {name: v.to(self.device) for name, v in batch.items()}

    def backward(self, learner: Learner, batch: dict[str, Tensor] | None, trained: int) -> tuple[Tensor, bool]:
        """Forward and token-weighted backward of one micro-batch: its summed token losses, and whether they
        count. A rank whose share is empty (`batch` None) runs a two-token batch with weight 0, because DDP
        all-reduces in every backward and the other ranks' backward would otherwise wait for it."""
        counted = batch is not None
        token_losses = self.backward_batch(learner.forward, batch if counted else self._fallback_batch())
        (token_losses * (self.world / trained if counted else 0.0)).backward()
        return token_losses, counted

    def _fallback_batch(self) -> dict[str, Tensor]:
        """Two pad tokens, one of them 'trained': a forward every rank can run when it has no rows of its own."""
        pad = self.pad_id
        return {k: v.to(self.device) for k, v in collate([{"input_ids": [pad, pad], "labels": [IGNORE_INDEX, pad]}], pad).items()}

    def backward_batch(self, forward: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The summed token losses of one collated batch, under the run's precision."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.schedule.precision == "bf16" else nullcontext()
        with autocast:
            return forward(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"))

    @staticmethod
    def _by_task(picks: list[tuple[str, int]], size: int) -> list[tuple[str, list[tuple[str, int]]]]:
        """The global batch as task-homogeneous micro-batches of at most `size` examples, tasks in sorted order."""
        chunks = []
        for task in sorted({t for t, _ in picks}):
            mine = [pick for pick in picks if pick[0] == task]
            chunks += [(task, mine[k : k + size]) for k in range(0, len(mine), size)]
        return chunks


def _consecutive(counts: dict[str, int]) -> dict[str, slice]:
    """Back-to-back slices of the given sizes, in the dict's order."""
    out, start = {}, 0
    for key, n in counts.items():
        out[key], start = slice(start, start + n), start + n
    return out
