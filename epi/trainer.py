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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from epi import checkpoint
from epi.data.format import collate, encode_task
from epi.data.load import load_tasks
from epi.data.mixture import MixtureSampler, sampling_weights
from epi.errors import UserError
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


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_state: dict[str, Any] | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.strategy = build_strategy(cfg.strategy)  # checks its keys before anything is written
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
        self.data_stats = {name: e.stats for name, e in encoded.items()}
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
        for task, stats in self.data_stats.items():
            self.logger.log(0, "data", stats, task=task)
        self.stages = self.strategy.prepare(self, default_stages(cfg))
        self.total_steps = sum(stage.steps for stage in self.stages)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer, lr_factor(s, self.total_steps))
        self.step = 0
        if resume_state is not None:
            self._load(resume_state)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, dict[str, float]]:
        cfg, s = self.cfg, self.cfg.schedule
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        stage_end = 0
        for index, stage in enumerate(self.stages):
            stage_start, stage_end = stage_end, stage_end + stage.steps
            if self.step >= stage_end:
                continue  # finished before a resume
            weights = {t: stage.weights.get(t, 1.0) if t in stage.tasks else 0.0 for t in self.tasks}
            self.sampler.set_weights(sampling_weights(self.sampler.sizes, weights, cfg.data.temperature))
            if self.step == stage_start:
                self.strategy.on_stage_start(stage, self.step)
            while self.step < stage_end:
                self.step += 1
                step, tic = self.step, time.perf_counter()
                loss, grad_norm, tokens = self.train_step(step)

                tokens_per_s = tokens / (time.perf_counter() - tic)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", stage=stage.name)
                if s.log_every and step % s.log_every == 0:
                    lr = self.scheduler.get_last_lr()[0]
                    self.logger.log(step, "train", {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tokens_per_s})
                if s.eval_every and step % s.eval_every == 0 and step < self.total_steps:
                    self.evaluate(step, cfg.eval.split)
                if s.checkpoint_every and step % s.checkpoint_every == 0:
                    self.save_checkpoint()
            self.strategy.on_stage_end(stage, self.step)
            self.log_realised()
            if len(self.stages) > 1:  # the accuracy matrix of sequential training: every task after every stage
                self.evaluate(self.step, f"{cfg.eval.split}/after_stage{index}")
        bar.close()
        self.save_checkpoint()
        results = self.evaluate(self.step, cfg.eval.split)
        self.save_model(self.run_dir / "model")
        self.logger.close()
        return results

    def train_step(self, step: int) -> tuple[float, float, int]:
        """One optimizer step with the strategy hooks at their fixed points; returns (loss, grad norm, tokens)."""
        s = self.cfg.schedule
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if s.precision == "bf16" else nullcontext()
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        for _ in range(s.grad_accum):
            batch = self._next_batch()
            with autocast:
                loss = self.forward(**batch).loss / s.grad_accum
            loss.backward()
            loss_sum += loss.detach()  # stays on the device: one host sync per step, below
            tokens += batch["attention_mask"].sum()
        self.strategy.after_backward(step)
        self.optimizer.hide_isolated_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.named_params.values(), s.clip_norm or math.inf)
        self.optimizer.step(clip_coefficient(grad_norm, s.clip_norm) if s.clip_norm else 1.0)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.after_step(step)
        loss_value, norm_value, token_count = torch.stack([loss_sum, grad_norm.float(), tokens.float()]).tolist()
        return loss_value, norm_value, int(token_count)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        picks = self.sampler.next_batch(self.cfg.schedule.batch_size)
        for task, i in picks:  # the global batch: the same count on every rank
            self.realised[task]["examples"] += 1
            self.realised[task]["tokens"] += len(self.train_sets[task][i]["input_ids"])
        picks = picks[self.rank :: self.world]  # same draw on every rank, one shard each
        batch = collate([self.train_sets[task][i] for task, i in picks], self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

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
        if self.rank != 0:
            return
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def save_checkpoint(self) -> None:
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
                "strategy": self.strategy.state_dict(),
                "rng": checkpoint.rng_state(),
                "config": OmegaConf.to_container(self.cfg, resolve=True),
            },
        )

    def _load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.realised = state["realised"]
        self.strategy.load_state_dict(state["strategy"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]

