"""The time side of a run's plan (`python -m epi.plan`): its stages, the tokens they train on, the compute a strategy
charges besides them (CPI's probes, LoTA's calibrations, exclusive EPI's calibration batches, Spectrum's scan), read
off the same rules the trainer and the strategies apply, and the speed of a few real steps measured here.

Tokens are counted at `data.max_len` per example (an upper bound, no data read) or at each task's mean length when
the data is read (`plan.lengths=measured`, or a measured run); the compute counter is the one epi/step.py keeps
(`charge`): optimizer steps and tokens, probes and calibrations included.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from epi.config import RunConfig, typed
from epi.errors import UserError
from epi.memory import Shapes
from epi.strategies import Stage, Strategy
from epi.strategies.cpi import CPI
from epi.strategies.epi import EvolvingIsolation
from epi.strategies.lota import LoTA
from epi.strategies.spectrum import Spectrum, module_type


def world_size(run: RunConfig) -> int:
    """plan.world_size, else torchrun's WORLD_SIZE, else 1."""
    if run.plan.world_size is not None:
        return run.plan.world_size
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class StagePlan:
    name: str
    tasks: tuple[str, ...]
    steps: int
    tokens: int  # the global batch's tokens over the stage: an upper bound at max_len, or at the measured mean length


@dataclass(frozen=True)
class TaskLengths:
    """A task's training examples as the trainer encodes them (fitted to data.max_len)."""

    mean: float  # tokens of an example, on average
    mean_trained: float  # of which carry loss
    longest: int  # the most tokens of one example: the longest row a micro-batch can be padded to
    most_trained: int  # the most trained tokens of one example


@dataclass(frozen=True)
class Charge:
    """Compute a strategy spends besides the stages' steps, as the run's compute counter charges it (epi/step.py)."""

    what: str
    optimizer_steps: int
    tokens: int
    note: str = ""


def default_stages(run: RunConfig) -> list[Stage]:
    from epi.trainer import default_stages as stages  # the trainer's own rule (imported late: it pulls in the data code)

    return stages(run)


def token_lengths(run: RunConfig, measured: tuple[float, dict[str, TaskLengths]] | None) -> tuple[str, dict[str, TaskLengths] | None]:
    """How a step's tokens are counted, and each task's lengths when the data is read (plan.lengths=measured, or a
    measured run); None: every example counts data.max_len tokens."""
    if measured is not None:
        return "each task's mean example length, read from the data of the measured run", measured[1]
    if run.plan.lengths == "max_len":
        return f"every example at data.max_len={run.data.max_len} tokens (an upper bound)", None
    return "each task's mean example length, read and tokenized", read_lengths(run)


def task_lengths(rows: list[dict[str, list[int]]]) -> TaskLengths:
    from epi.loss import trained_tokens

    if not rows:
        return TaskLengths(0.0, 0.0, 0, 0)
    tokens = [len(r["input_ids"]) for r in rows]
    trained = [trained_tokens(r["labels"]) for r in rows]
    return TaskLengths(sum(tokens) / len(rows), sum(trained) / len(rows), max(tokens), max(trained))


def read_lengths(run: RunConfig) -> dict[str, TaskLengths]:
    """Each task's training examples, encoded as the trainer encodes them, measured."""
    from epi.data.load import encode_tasks, load_tasks
    from epi.models import build_tokenizer

    if run.plan.model_config is not None:
        raise UserError("plan.lengths=measured reads the data with the model's tokenizer, and plan.model_config gives "
                        "none: use plan.lengths=max_len, or model.name_or_path with a tokenizer")
    tokenizer = build_tokenizer(run.composed.model)
    encoded = encode_tasks(tokenizer, load_tasks(run.composed.data), run.composed.data)
    return {task: task_lengths(e.rows) for task, e in encoded.items()}


def example_tokens(run: RunConfig, tasks: tuple[str, ...], weights: dict[str, float], per_task: dict | None) -> float:
    """Tokens of one example drawn from `tasks` at their sampling weights: max_len, or their measured mean."""
    if per_task is None:
        return float(run.data.max_len)
    from epi.data.mixture import sampling_weights

    sizes = {t: 1 for t in tasks}  # the weights alone, unless a temperature asks for the sizes (read below)
    if run.data.temperature is not None:
        sizes = {t: run.data.n_train for t in tasks}
    w = sampling_weights(sizes, {t: weights.get(t, 1.0) for t in tasks}, run.data.temperature)
    total = sum(w.values()) or 1.0
    return sum(w[t] * per_task[t].mean for t in tasks) / total


def stage_plan(run: RunConfig, strategy: Strategy, stages: list[Stage], per_task: dict | None,
               shapes: Shapes) -> tuple[list[StagePlan], str, list[Charge]]:
    """The stages the run trains, a note where the strategy decides them at run time, and the compute it charges
    besides them: CPI's probes, LoTA's calibrations, exclusive EPI's calibration batches, Spectrum's scan."""
    s = run.schedule
    batch = s.batch_size * s.grad_accum

    def tokens(steps: int, tasks: tuple[str, ...], weights: dict[str, float]) -> int:
        return round(steps * batch * example_tokens(run, tasks, weights, per_task))

    tasks = tuple(run.data.tasks)
    if isinstance(strategy, CPI):
        return _cpi_stages(run, strategy, tasks, tokens)
    charges: list[Charge] = []
    plan: list[StagePlan] = []
    for stage in stages:
        steps = stage.steps
        if isinstance(strategy, LoTA):
            cost = strategy.cfg.calibration_steps * len(stage.tasks)
            charges.append(Charge(f"lota calibration of stage {stage.name!r}: {len(stage.tasks)} task(s) x "
                                  f"{strategy.cfg.calibration_steps} steps", cost,
                                  sum(tokens(strategy.cfg.calibration_steps, (t,), {}) for t in stage.tasks)))
            if strategy.cfg.count_calibration_in_budget:
                steps -= cost
        plan.append(StagePlan(stage.name, stage.tasks, steps, tokens(steps, stage.tasks, stage.weights)))
    if isinstance(strategy, EvolvingIsolation) and strategy.cfg.mode == "exclusive":
        start = 0
        for stage in stages:
            refreshes = sum(1 for step in range(start + 1, start + stage.steps + 1) if strategy.is_refresh(step))
            start += stage.steps
            n = refreshes * len(stage.tasks) * strategy.cfg.calibration_batches
            if n:
                charges.append(Charge(f"calibration batches of stage {stage.name!r}: {refreshes} refreshes x {len(stage.tasks)} "
                                      f"task(s) x {strategy.cfg.calibration_batches}", 0,
                                      round(n * s.batch_size * example_tokens(run, stage.tasks, {}, per_task)),
                                      "a forward and backward of batch_size examples each, no update"))
    if isinstance(strategy, Spectrum):
        scanned = [n for n in shapes.trainable if n.endswith(".weight")]
        if strategy.cfg.module_types is not None:
            scanned = [n for n in scanned if module_type(n.removesuffix(".weight")) in strategy.cfg.module_types]
        charges.append(Charge(f"spectrum scan: {len(scanned)} SVDs of the weights", 0, 0, "no tokens: nothing is charged"))
    return plan, "", charges


def _cpi_stages(run: RunConfig, strategy: CPI, tasks: tuple[str, ...], tokens) -> tuple[list[StagePlan], str, list[Charge]]:
    """CPI and multistage: one stage per group of tasks whose cores overlap; the probes decide the groups, so the
    plan gives the stages for every possible number of groups (one stage per task when tau > 1, one when tau = 0)."""
    cfg = strategy.cfg
    n = len(tasks)
    probes = Charge(f"{strategy.name} probes: {n} tasks x {cfg.probe_steps} steps", n * cfg.probe_steps,
                    sum(tokens(cfg.probe_steps, (t,), {}) for t in tasks),
                    "charged from the cache too when a probe was cached")
    low, high = (1, 1) if cfg.tau == 0 else (n, n) if cfg.tau > 1 else (1, n)
    budget = run.schedule.steps - (cfg.probe_steps * n if cfg.count_probes_in_budget else 0)
    if budget < 1 and cfg.stage_steps is None:
        raise UserError(f"strategy.count_probes_in_budget=true: the {n} probes of strategy.probe_steps={cfg.probe_steps} "
                        f"take all of schedule.steps={run.schedule.steps}; raise schedule.steps or lower strategy.probe_steps")

    def total(groups: int) -> int:
        if cfg.stage_steps is None:
            return groups * max(1, budget // groups)
        return groups * cfg.stage_steps - (cfg.probe_steps * n if cfg.count_probes_in_budget else 0)

    groups = high  # shown: the most groups there can be
    each = total(groups) // groups
    # stage_data=mixed: every stage trains on every task; group: on its group's (which, the probes say)
    shown = tasks if cfg.stage_data == "mixed" else ("its group's tasks",)
    stages = [StagePlan(f"group{i}", shown, each, tokens(each, tasks, {})) for i in range(groups)]
    note = ""
    if low != high:
        totals = sorted({total(g) for g in range(low, high + 1)})
        note = (f"{low} to {high} stages: the probes group the tasks whose cores overlap (Jaccard >= tau={cfg.tau}); shown: "
                f"{high} groups; the stages train {totals[0]:,} to {totals[-1]:,} steps in all")
    return stages, note, [probes]


# ---------------------------------------------------------------- measuring
def measure(run: RunConfig) -> tuple[float, dict[str, TaskLengths]]:
    """plan.measure_steps real steps of this config here (one process, after one warm-up step, in a temporary
    directory, logger off; the trainer is built as train.py builds it, so a CPI run probes first): their tokens per
    second, and the lengths of the data the trainer encoded."""
    from epi.trainer import Trainer

    if world_size(run) > 1:
        raise UserError(f"plan.measure_steps times one process on this machine, which says nothing of {world_size(run)} "
                        "ranks: give the measured speed of the job itself as plan.tokens_per_s")
    if run.device == "cuda" and not torch.cuda.is_available():
        raise UserError("plan.measure_steps runs the steps here, and device=cuda but this machine has no GPU; "
                        "use device=auto, or give plan.tokens_per_s")
    composed = copy.deepcopy(run.composed)
    composed.logger.mode = "disabled"
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        if "cache_dir" in composed.strategy:  # CPI's probes run (the trainer's prepare) but are not cached by a plan
            composed.strategy.cache_dir = str(Path(tmp) / "probes")
        trainer = Trainer(typed(composed), Path(tmp))
        stage = trainer.stages[0]
        trainer.learner.horizon = stage.steps
        trainer.strategy.on_stage_start(0, stage, 0)
        seconds, tokens = 0.0, 0
        for step in range(1, run.plan.measure_steps + 2):
            tic = time.perf_counter()
            out = trainer.train_step(step)
            if step > 1:
                seconds += time.perf_counter() - tic
                tokens += out.tokens
        lengths = {task: task_lengths(rows) for task, rows in trainer.train_sets.items()}
    return tokens / seconds, lengths
