"""The training loop. `Trainer` builds a run in named `_setup_*` steps; `fit` runs the stages, one step at a time.

Inside `fit`, each step: `train_step` (epi/step.py: draw, forward/backward, finite check, strategy.after_backward,
clip, optimizer.step with isolated coordinates held bit-exactly, LR schedule, strategy.after_step) -> log -> eval
-> stage close -> checkpoint. Evaluation, retention, the general checks, saving and resuming live here too.

Strategies never see the `Trainer`: they get a `TrainerContext` (the `Context` protocol of
`epi.strategies.base`), whose services train a copy of the model (CPI's probes) on the same `Stepper`,
so clipping, accumulation, precision and data parallelism are the same.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from epi import checkpoint, general, retention, rundir
from epi.components import build
from epi.config import RunConfig, typed
from epi.context import TrainerContext
from epi.data.contamination import contamination, contamination_warning
from epi.data.load import encode_tasks, format_stats, load_general, load_tasks
from epi.data.mixture import MixtureSampler, sampling_weights
from epi.distributed import init_distributed, pick_device, precision_warning, seed_everything
from epi.errors import TrainingDiverged, UserError
from epi.evaluate import average, evaluate, generation_limits
from epi.judge import judge_for
from epi.loss import CausalLMLoss, trained_tokens
from epi.masks import all_finite
from epi.models import build_model, check_attention
from epi.optim import IsolatedOptimizer
from epi.sharding import full_state_dict, local, unsharded_root
from epi.step import RUN, NonFiniteUpdate, StepResult, Stepper
from epi.strategies import Stage, Strategy, build_strategy


def default_stages(cfg: RunConfig) -> list[Stage]:
    """`schedule.stages` if given (sequential training), else one stage over the whole mixture."""
    weights = dict(cfg.data.weights or {})
    if not cfg.schedule.stages:
        return [Stage("mix", tuple(cfg.data.tasks), cfg.schedule.steps, weights)]
    return [
        Stage(s.name if s.name is not None else f"stage{i}", tuple(s.tasks), s.steps, {t: weights.get(t, 1.0) for t in s.tasks})
        for i, s in enumerate(cfg.schedule.stages)
    ]


PREDICTION_SAMPLE = 10  # predictions per task in the W&B table


class Trainer:
    def __init__(self, cfg: RunConfig | DictConfig, run_dir: Path, resume_state: dict[str, Any] | None = None):
        """`cfg`: the typed config `validate` returns (a composed DictConfig is parsed into one, as tests pass it)."""
        self.cfg: RunConfig = cfg if isinstance(cfg, RunConfig) else typed(cfg)
        self.run_dir = Path(run_dir)
        self._setup_strategy()
        self._setup_distributed()
        self._setup_data()
        self._setup_model()
        self._setup_tokenized_data()
        self._setup_optimizer()
        self._setup_logger(replaying=resume_state is not None)
        self._setup_retention(measure=resume_state is None)
        self._setup_general(measure=resume_state is None)
        ctx = TrainerContext(cfg=self.cfg, stepper=self.stepper, learner=self.learner, logger=self.logger, run_dir=self.run_dir,
                             tasks=tuple(self.tasks))
        self.context = ctx  # the strategy's view of the run (and its training services)
        self.stages = self.strategy.prepare(ctx, default_stages(self.cfg))
        self._setup_lr_schedule()
        self.step = 0
        self.last_checkpoint: int | None = None  # step of the newest checkpoint this run wrote
        self._evaluated: tuple[int, dict, list] | None = None  # (step, results, predictions) of the last evaluation
        if resume_state is not None:
            self._load(resume_state)
            self.logger.muted = False  # from here on, the events are new

    # ---------------------------------------------------------------- setup, in order
    def _setup_strategy(self) -> None:
        """Built first: its keys and its stage plan are checked before anything is written."""
        self.strategy: Strategy = build_strategy(self.cfg.composed.strategy)
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
        if self.cfg.schedule.batch_size % self.world:
            raise UserError(f"schedule.batch_size={self.cfg.schedule.batch_size} must be divisible by the number of processes ({self.world})")
        if self.rank == 0 and (warning := precision_warning(self.device, self.cfg.schedule.precision)):
            print(warning, file=sys.stderr)

    def _setup_data(self) -> None:
        """The tasks with their splits, and the general checks'; before the model, so a bad dataset fails before a slow model load."""
        self.raw_tasks = load_tasks(self.cfg.composed.data)
        self.raw_general = load_general(self.cfg.eval.general.tasks, self.cfg.composed.data)

    def _setup_model(self) -> None:
        check_attention(self.cfg.composed.model, self.device)
        self.model, self.tokenizer = build_model(self.cfg.composed.model)
        self.model.to(self.device)
        vocab = self.model.get_output_embeddings().out_features
        CausalLMLoss(self.model, self.cfg.schedule.lm_head).check(vocab, self.device)
        self.judge = judge_for([*self.raw_tasks.values(), *self.raw_general.values()], self.cfg.eval.judge, self.device)

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
        self.general_tasks = general.encode_general(self.tokenizer, self.raw_general, cfg.composed.data, cfg.eval.split)

    def _setup_retention(self, measure: bool) -> None:
        """Held-out text for general-ability retention (`eval.retention` passages; epi/retention.py), measured
        on the model as loaded: before a strategy's `prepare` changes it (CPI's fusion) and before any step."""
        n = self.cfg.eval.retention
        self.retention = retention.build(self.tokenizer, n, self.cfg.data.max_len) if n else None
        self.retention_before: dict[str, float] | None = None  # a resume restores it from the checkpoint
        if self.retention is not None and measure:
            self.retention_before = self.log_retention(0)

    def _setup_general(self, measure: bool) -> None:
        """The general checks (`eval.general.tasks`; epi/general.py) scored on the model as loaded, like retention."""
        self.general_before: dict[str, dict[str, float]] | None = None  # a resume restores it from the checkpoint
        if self.general_tasks and measure:
            self.general_before = self.evaluate_general(0)[0]

    def _setup_optimizer(self) -> None:
        """The stepper, and the run's learner: the optimizer config node wrapped by the isolation engine."""
        self.stepper = Stepper(self.cfg, self.model, self.tokenizer.pad_token_id, self.train_sets, self.trained_counts,
                               self.device, self.rank, self.world, self.sharded)
        self.learner = self.stepper.new_learner(RUN, self.model, {t: 1.0 for t in self.tasks})

    def _setup_logger(self, replaying: bool) -> None:
        """metrics.jsonl (and W&B); muted while a resumed run rebuilds what its checkpoint's events already hold."""
        cfg = self.cfg
        make_logger = build(cfg.composed.logger, "logger")
        self.logger = make_logger(
            self.run_dir if self.rank == 0 else None,  # one writer: rank 0
            mode=cfg.logger.mode if self.rank == 0 else "disabled",
            config=OmegaConf.to_container(cfg.composed, resolve=True),
        )
        self.logger.muted = replaying
        self.stepper.logger = self.logger  # a skipped update is logged
        if self.rank == 0:
            print(format_stats(self.data_stats, cfg.data.max_len, cfg.data.truncate))
            if warning := contamination_warning(self.overlap, cfg.data.contamination_warn):
                print(warning)
        for task, stats in self.data_stats.items():
            self.logger.log(0, "data", stats, task=task)

    def _setup_lr_schedule(self) -> None:
        """After `prepare`: the schedule spans the steps of the strategy's plan."""
        self.total_steps = sum(stage.steps for stage in self.stages)
        self.learner.scheduler = build(self.cfg.composed.lr_scheduler, "lr_scheduler")(self.optimizer.optimizer, total_steps=self.total_steps)

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
                            "padding": 1 - out.tokens / out.cells,  # what data.packing removes (docs/performance.md)
                            "skipped_steps": self.stepper.skipped,
                        })
                    if s.eval_every and step % s.eval_every == 0 and step < self.total_steps:
                        self.evaluate(step, cfg.eval.split)
                    if step == stage_end:  # before this step's checkpoint, so a resume never skips it
                        self.close_stage(index, stage)
                    if s.checkpoint_every and step % s.checkpoint_every == 0:
                        self.save_checkpoint()
        if self.last_checkpoint != self.step:
            self.save_checkpoint()
        self.logger.log(self.step, "compute", dict(self.stepper.compute))  # the run's cost, for equal-compute comparisons
        self.predictions: list[dict[str, Any]] = []
        results = self.evaluate(self.step, cfg.eval.split, self.predictions)
        if self.retention is not None:
            after = self.log_retention(self.step)
            self.write_retention(after)
        if self.general_tasks:
            after, records = self.evaluate_general(self.step)
            if self.rank == 0:
                print(general.write_general(self.run_dir, cfg.eval.split, self.general_tasks, self.general_before, after, records))
        for task in self.tasks:  # a few predictions per task on the dashboard; all of them in predictions_<split>.jsonl
            rows = [[r["prompt"], r["reference"], r["prediction"], r["score"], r["loss"]] for r in self.predictions if r["task"] == task]
            self.logger.table(f"predictions/{task}", ["prompt", "reference", "prediction", "score", "loss"], rows[:PREDICTION_SAMPLE])
        self.save_model(self.run_dir / rundir.MODEL)
        self.logger.close()
        return results

    def close_stage(self, index: int, stage: Stage) -> None:
        """A stage's closing work: the strategy's hook, the realised mixture, the accuracy-matrix row and, per example,
        its predictions (`predictions_<split>_after_stage<k>.jsonl`)."""
        self.strategy.on_stage_end(index, stage, self.step)
        self.log_realised()
        if len(self.stages) > 1:  # the accuracy matrix of sequential training: every task after every stage
            records: list[dict[str, Any]] = []
            self.evaluate(self.step, f"{self.cfg.eval.split}/after_stage{index}", records)
            if self.rank == 0:  # per example, for the forgetting report's right -> wrong transitions
                rundir.write_predictions(self.run_dir, rundir.predictions(self.cfg.eval.split, after_stage=index), records)

    def train_step(self, step: int) -> StepResult:
        """One step of the run's learner with the run's strategy (`Stepper.train_step`); an update that would not
        be finite under schedule.nonfinite=stop ends the run here, naming the last good checkpoint."""
        try:
            return self.stepper.train_step(step, self.learner, self.strategy)
        except NonFiniteUpdate as e:
            self.logger.close()
            s = self.cfg.schedule
            raise TrainingDiverged(
                f"{e.what}; training diverged and was stopped before the update; {self._last_good()}, and no model was saved. "
                f"Usual fixes: a lower optimizer.lr (now {self.cfg.optimizer.lr:g}, lr at this step {e.lr:.3g}), a longer schedule.warmup_steps "
                f"(now {s.warmup_steps}), schedule.clip_norm (now {s.clip_norm}), schedule.precision=fp32 (now {s.precision}); "
                "or schedule.nonfinite=skip to drop such updates and count them."
            ) from None

    def log_realised(self) -> None:
        """The mixture as trained so far: examples and tokens drawn per task, and each task's share of the tokens."""
        realised = self.learner.realised
        total = sum(r["tokens"] for r in realised.values()) or 1
        for task, r in realised.items():
            self.logger.log(self.step, "mixture", {**r, "token_share": r["tokens"] / total}, task=task)
        if self.rank == 0:
            shares = (f"{t} {r['examples']} ex / {r['tokens']} tok ({r['tokens'] / total:.0%})" for t, r in realised.items())
            tqdm.write(f"realised mixture at step {self.step}: " + ", ".join(shares))

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
            with unsharded_root(self.stepper.root):
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
                    execution=e.execution,
                    judge=self.judge,
                )
            self._evaluated = (step, results, records)
        if predictions is not None:
            predictions += records
        for task, metrics in results.items():
            self.logger.log(step, split_name, metrics, task=task)
        self.logger.log(step, split_name, {f"avg_{k}": v for k, v in average(results).items()})
        return results

    def evaluate_general(self, step: int) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
        """The general checks now, logged under split `general` at `step`, with one prediction record per example."""
        with unsharded_root(self.stepper.root):
            results, records = general.evaluate_general(self.model, self.tokenizer, self.general_tasks, self.cfg.eval,
                                                        self.cfg.composed.data, self.judge)
        for task, metrics in results.items():
            self.logger.log(step, general.SPLIT, metrics, task=task)
        return results, records

    def log_retention(self, step: int) -> dict[str, float]:
        """Perplexity of the held-out text now, logged under `retention` at `step`."""
        with unsharded_root(self.stepper.root):
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
                "skipped": self.stepper.skipped,
                "compute": self.stepper.compute,
                "retention_before": self.retention_before,
                "general_before": self.general_before,
                "config": OmegaConf.to_container(self.cfg.composed, resolve=True),
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
        self.stepper.skipped = state["skipped"]
        self.stepper.compute = state["compute"]
        self.retention_before = state.get("retention_before")  # absent from checkpoints written before eval.retention
        self.general_before = state.get("general_before")  # absent from checkpoints written before eval.general
        self.strategy.load_state_dict(state["strategy"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
