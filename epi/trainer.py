"""The training loop. `Trainer.__init__` builds what a run needs; `fit` runs the stages, `train_step` is one step.

Order inside every step (the strategy hooks are the only extension points):
forward/backward per micro-batch -> strategy.after_backward -> clip -> optimizer.step
(isolated coordinates held bit-exactly) -> LR schedule -> strategy.after_step -> log/eval/checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from epi import checkpoint
from epi.data.contamination import contamination, contamination_warning
from epi.data.format import IGNORE_INDEX, collate, encode_task
from epi.data.load import load_tasks
from epi.data.mixture import MixtureSampler, sampling_weights
from epi.errors import TrainingDiverged, UserError
from epi.evaluate import average, evaluate
from epi.logging import RunLogger
from epi.models import build_model
from epi.optim import IsolatedOptimizer, clip_coefficient
from epi.strategies import Stage, build_strategy


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(schedule: DictConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine / linear decay to `min_lr_ratio`, or constant. `i` counts finished steps."""
    warmup, floor = schedule.warmup_steps, schedule.min_lr_ratio

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        if schedule.decay == "constant":
            return 1.0
        progress = min(1.0, (i - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


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


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the trained positions (labels != IGNORE_INDEX), in fp32.

    The caller divides by the global batch's trained-token count (`trained_tokens`); with one
    micro-batch on one process that is exactly the mean Hugging Face's `labels=` loss computes.
    """
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def trained_tokens(labels: list[int]) -> int:
    """Positions `causal_lm_loss_sum` counts: labels after the first (nothing predicts the first token)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


@dataclass(frozen=True)
class StepResult:
    loss: float  # the global batch's mean loss per trained token
    grad_norm: torch.Tensor | float  # the clipped-over norm (isolated coordinates excluded); a tensor until logged
    lr: float  # the learning rate this step applied
    tokens: int  # tokens in the global batch, padding excluded
    trained_tokens: int  # of which carry loss


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_state: dict[str, Any] | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.strategy = build_strategy(cfg.strategy)  # checks its keys before anything is written
        self.strategy.check_plan(default_stages(cfg))  # and whether it can serve this run's stages
        seed_everything(cfg.seed)
        self.device = pick_device(cfg.device)
        self.rank, self.world = init_distributed(self.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        tasks = load_tasks(cfg.data)
        self.model, self.tokenizer = build_model(cfg.model)
        encoded = {name: encode_task(self.tokenizer, task, cfg.data.max_len, cfg.data.truncate) for name, task in tasks.items()}
        self.tasks = {name: e.task for name, e in encoded.items()}  # eval splits without what max_len cannot hold
        self.train_sets = {name: e.rows for name, e in encoded.items()}
        self.trained_counts = {name: [trained_tokens(r["labels"]) for r in rows] for name, rows in self.train_sets.items()}
        overlap = contamination(tasks)  # eval prompts that are also training prompts, per task and split
        self.data_stats = {name: {**e.stats, **e.task.input_stats, **overlap[name]} for name, e in encoded.items()}
        self.realised = {name: {"examples": 0, "tokens": 0} for name in tasks}  # what training actually drew
        self.model.to(self.device)
        # Data parallel: DDP averages gradients in backward, so every rank sees the same gradients,
        # the same importance and therefore the same masks (EPI all-reduces its scores as well).
        self.forward = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        if cfg.schedule.batch_size % self.world:
            raise UserError(f"schedule.batch_size={cfg.schedule.batch_size} must be divisible by the number of processes ({self.world})")
        self.sampler = MixtureSampler(
            {name: len(rows) for name, rows in self.train_sets.items()},
            {name: 1.0 for name in self.tasks},
            seed=cfg.seed,
        )
        self.named_params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        s = cfg.schedule
        decay = [p for p in self.named_params.values() if p.dim() >= 2]  # matrices decay; norms and biases do not
        no_decay = [p for p in self.named_params.values() if p.dim() < 2]
        adamw = torch.optim.AdamW(
            [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=s.lr,
            betas=tuple(s.betas),
        )
        self.optimizer = IsolatedOptimizer(adamw, self.named_params, moments=s.isolated_moments)
        self.logger = RunLogger(
            self.run_dir if self.rank == 0 else None,  # one writer: rank 0
            wandb_mode=cfg.logger.mode if self.rank == 0 else "disabled",
            project=cfg.logger.project,
            name=cfg.logger.name,
            group=cfg.logger.group,
            config=OmegaConf.to_container(cfg, resolve=True),
            tags=list(cfg.logger.tags),
        )
        if self.rank == 0:
            print(format_stats(self.data_stats, cfg.data))
            if warning := contamination_warning(overlap, cfg.data.contamination_warn):
                print(warning)
        for task, stats in self.data_stats.items():
            self.logger.log(0, "data", stats, task=task)
        self.stages = self.strategy.prepare(self, default_stages(cfg))
        self.total_steps = sum(stage.steps for stage in self.stages)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer, lr_factor(s, self.total_steps))
        self.step = 0
        self.skipped = 0  # updates dropped for a non-finite loss or gradient (schedule.nonfinite=skip)
        self.last_checkpoint: int | None = None  # step of the newest checkpoint this run wrote
        if resume_state is not None:
            self._load(resume_state)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, dict[str, float]]:
        cfg, s = self.cfg, self.cfg.schedule
        with tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True) as bar:  # closed before any error prints
            stage_end = 0
            for index, stage in enumerate(self.stages):
                stage_start, stage_end = stage_end, stage_end + stage.steps
                if self.step >= stage_end:
                    continue  # finished, closing work included, before a resume
                weights = {t: stage.weights.get(t, 1.0) if t in stage.tasks else 0.0 for t in self.tasks}
                self.sampler.set_weights(sampling_weights(self.sampler.sizes, weights, cfg.data.temperature))
                if self.step == stage_start:
                    self.strategy.on_stage_start(stage, self.step)
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
        results = self.evaluate(self.step, cfg.eval.split)
        self.save_model(self.run_dir / "model")
        self.logger.close()
        return results

    def close_stage(self, index: int, stage: Stage) -> None:
        """A stage's closing work: the strategy's hook, the realised mixture, the accuracy-matrix row."""
        self.strategy.on_stage_end(stage, self.step)
        self.log_realised()
        if len(self.stages) > 1:  # the accuracy matrix of sequential training: every task after every stage
            self.evaluate(self.step, f"{self.cfg.eval.split}/after_stage{index}")

    def train_step(self, step: int) -> StepResult:
        """One optimizer step with the strategy hooks at their fixed points.

        The loss is token-weighted over the whole global batch: every micro-batch on every rank
        adds its summed token losses divided by the global batch's trained-token count, so
        `grad_accum=k` equals one k times larger batch and N ranks equal one process (DDP's
        gradient average is undone by the factor `world`).
        """
        s = self.cfg.schedule
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if s.precision == "bf16" else nullcontext()
        self.model.train()
        micro_batches, tokens, trained = self._draw_step()
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            with autocast:
                logits = self.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            token_losses = causal_lm_loss_sum(logits, batch["labels"])
            (token_losses * (self.world / trained)).backward()
            loss_sum += token_losses.detach()  # stays on the device until the one check below
        if self.world > 1:
            dist.all_reduce(loss_sum)  # the logged loss is the global batch's, not this rank's shard's
        params = list(self.named_params.values())
        raw_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        loss, raw = (torch.stack([loss_sum / trained, raw_norm.float()])).tolist()  # the step's one host sync
        lr = self.scheduler.get_last_lr()[0]  # the lr this step applies
        if not (math.isfinite(loss) and math.isfinite(raw)):
            self._non_finite(step, loss, raw, lr)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.strategy.after_step(step)
            return StepResult(loss, raw, lr, tokens, trained)

        self.strategy.after_backward(step)
        self.optimizer.hide_isolated_grads()
        if self.optimizer.index:  # the clip norm must not count isolated gradients
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            grad_norm = raw_norm
        if s.clip_norm:
            torch.nn.utils.clip_grads_with_norm_(params, s.clip_norm, grad_norm)
        self.optimizer.step(clip_coefficient(grad_norm, s.clip_norm) if s.clip_norm else 1.0)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.after_step(step)
        return StepResult(loss, grad_norm, lr, tokens, trained)

    def _non_finite(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        """`schedule.nonfinite`: `stop` ends the run before the bad update; `skip` drops the update and counts it."""
        self.logger.log(step, "nonfinite", {"loss": loss, "grad_norm": grad_norm})
        what = f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite"
        if self.cfg.schedule.nonfinite == "skip":
            self.skipped += 1
            if self.rank == 0:
                tqdm.write(f"{what}: update skipped ({self.skipped} so far; schedule.nonfinite=skip)")
            return
        self.logger.close()
        last = (
            f"the last good checkpoint is {self.run_dir / checkpoint.FILENAME} (step {self.last_checkpoint})"
            if self.last_checkpoint is not None else "no checkpoint had been written yet"
        )
        s = self.cfg.schedule
        raise TrainingDiverged(
            f"{what}: training diverged and was stopped before the update; {last}, and no model was saved. "
            f"Usual fixes: a lower schedule.lr (now {s.lr:g}, lr at this step {lr:.3g}), a longer schedule.warmup_steps "
            f"(now {s.warmup_steps}), schedule.clip_norm (now {s.clip_norm}), schedule.precision=fp32 (now {s.precision}); "
            "or schedule.nonfinite=skip to drop such updates and count them."
        )

    def _draw_step(self) -> tuple[list[dict[str, torch.Tensor]], int, int]:
        """This step's micro-batches (this rank's shards), and the global batch's tokens and trained tokens.

        The whole global batch (batch_size x grad_accum examples) is drawn at once, the same on every
        rank, so its trained-token count needs no communication and `grad_accum=k` sees exactly the
        examples of one batch k times as large.
        """
        s = self.cfg.schedule
        picks = self.sampler.next_batch(s.batch_size * s.grad_accum)
        tokens = trained = 0
        for task, i in picks:
            row = self.train_sets[task][i]
            self.realised[task]["examples"] += 1
            self.realised[task]["tokens"] += len(row["input_ids"])
            tokens += len(row["input_ids"])
            trained += self.trained_counts[task][i]
        micro_batches = []
        for k in range(s.grad_accum):
            shard = picks[k * s.batch_size : (k + 1) * s.batch_size][self.rank :: self.world]
            batch = collate([self.train_sets[task][i] for task, i in shard], self.tokenizer.pad_token_id)
            micro_batches.append({name: v.to(self.device) for name, v in batch.items()})
        return micro_batches, tokens, trained

    def log_realised(self) -> None:
        """The mixture as trained so far: examples and tokens drawn per task, and each task's share of the tokens."""
        total = sum(r["tokens"] for r in self.realised.values()) or 1
        for task, r in self.realised.items():
            self.logger.log(self.step, "mixture", {**r, "token_share": r["tokens"] / total}, task=task)
        if self.rank == 0:
            shares = (f"{t} {r['examples']} ex / {r['tokens']} tok ({r['tokens'] / total:.0%})" for t, r in self.realised.items())
            tqdm.write(f"realised mixture at step {self.step}: " + ", ".join(shares))

    # ---------------------------------------------------------------- eval, save, resume
    def evaluate(self, step: int, split_name: str) -> dict[str, dict[str, float]]:
        e = self.cfg.eval
        results = evaluate(
            self.model,
            self.tokenizer,
            self.tasks,
            split=e.split,
            n_examples=e.n_examples,
            batch_size=e.batch_size,
            max_new_tokens=e.max_new_tokens,
            max_len=self.cfg.data.max_len,
            truncate=self.cfg.data.truncate,
        )
        for task, metrics in results.items():
            self.logger.log(step, split_name, metrics, task=task)
        self.logger.log(step, split_name, {f"avg_{k}": v for k, v in average(results).items()})
        return results

    def save_model(self, path: Path) -> None:
        """The final model in Hugging Face format, written to a temporary directory and renamed into place."""
        if self.rank != 0:
            return

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        checkpoint.write_atomically(path, write, checkpoint.nbytes(self.model.state_dict()), "model")

    def save_checkpoint(self) -> None:
        """Everything the rest of the run depends on, in types `torch.load(weights_only=True)` accepts."""
        self.last_checkpoint = self.step
        if self.rank != 0:
            return
        checkpoint.save(
            self.run_dir / checkpoint.FILENAME,
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "realised": self.realised,
                "skipped": self.skipped,
                "strategy": self.strategy.state_dict(),
                "rng": checkpoint.rng_state(),
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "metrics_lines": self.logger.lines,  # metrics.jsonl up to here belongs to this state
            },
        )

    def _load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.realised = state["realised"]
        self.skipped = state["skipped"]
        self.strategy.load_state_dict(state["strategy"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
