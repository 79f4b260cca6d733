"""Start-up checks: a value that makes no sense stops the run before anything is written.

Each check names the key, the bad value and what would be valid, so the fix is one override.
Strategy keys are checked by the strategy's own constructor (same `UserError`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from epi.data.format import TRUNCATE
from epi.data.sources import validate_source
from epi.data.tasks import BUILTIN_TASKS, MAX_PER_SPLIT
from epi.errors import UserError
from epi.logging import WANDB_MODES
from epi.models import DTYPES, MODEL_KINDS
from epi.optim import MOMENT_POLICIES

DECAYS = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
SPLITS = ("train", "val", "test")
NONFINITE = ("stop", "skip")  # schedule.nonfinite: what a non-finite loss or gradient norm does


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r}: {rule}")


def validate(cfg: DictConfig, known_tasks: set[str]) -> None:
    s = cfg.schedule
    _require(isinstance(cfg.seed, int), "seed", cfg.seed, "must be an integer")
    for key in ("steps", "batch_size", "grad_accum"):
        _require(isinstance(s[key], int) and s[key] > 0, f"schedule.{key}", s[key], "must be a positive integer")
    _require(s.lr > 0, "schedule.lr", s.lr, "must be > 0 (e.g. schedule.lr=3e-3)")
    _require(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")
    _require(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "must be >= 0")
    _require(s.decay in DECAYS, "schedule.decay", s.decay, f"must be one of {list(DECAYS)}")
    _require(s.weight_decay >= 0, "schedule.weight_decay", s.weight_decay, "must be >= 0")
    _require(all(0 <= b < 1 for b in s.betas) and len(s.betas) == 2, "schedule.betas", list(s.betas), "must be two numbers in [0, 1)")
    _require(s.clip_norm is None or s.clip_norm > 0, "schedule.clip_norm", s.clip_norm, "must be > 0, or null for no clipping")
    _require(s.precision in PRECISIONS, "schedule.precision", s.precision, f"must be one of {list(PRECISIONS)}")
    _require(s.isolated_moments in MOMENT_POLICIES, "schedule.isolated_moments", s.isolated_moments, f"must be one of {list(MOMENT_POLICIES)}")
    _require(s.nonfinite in NONFINITE, "schedule.nonfinite", s.nonfinite, f"must be one of {list(NONFINITE)}")
    for key in ("eval_every", "checkpoint_every", "log_every"):
        _require(isinstance(s[key], int) and s[key] >= 0, f"schedule.{key}", s[key], "must be an integer >= 0 (0 = never)")

    d = cfg.data
    _require(len(d.tasks) > 0, "data.tasks", list(d.tasks), "must name at least one task")
    for task in d.tasks:
        _require(task in known_tasks, "data.tasks", list(d.tasks), f"unknown task {task!r}; known tasks: {sorted(known_tasks)}")
    for task, w in (d.weights or {}).items():
        _require(task in d.tasks, f"data.weights.{task}", w, f"is not a task of data.tasks={list(d.tasks)}")
        _require(w >= 0, f"data.weights.{task}", w, "must be >= 0")
    for key in ("n_train", "n_val", "n_test", "max_len"):
        _require(isinstance(d[key], int) and d[key] > 0, f"data.{key}", d[key], "must be a positive integer")
    if any(task in BUILTIN_TASKS for task in d.tasks):  # dataset tasks take n_* as caps, generated ones must reach them
        for key in ("n_train", "n_val", "n_test"):
            _require(d[key] <= MAX_PER_SPLIT, f"data.{key}", d[key], f"the built-in tasks generate at most {MAX_PER_SPLIT} examples per split")
    _require(d.temperature is None or d.temperature > 0, "data.temperature", d.temperature, "must be > 0 (1 = proportional to size), or null for weights alone")
    _require(d.truncate in TRUNCATE, "data.truncate", d.truncate, f"must be one of {list(TRUNCATE)}")
    _require(0 <= d.contamination_warn <= 1, "data.contamination_warn", d.contamination_warn, "must be a fraction in [0, 1]")
    for name, source in (d.sources or {}).items():
        validate_source(f"data.sources.{name}", source)
    for i, stage in enumerate(s.stages or []):
        _require(stage.steps > 0, f"schedule.stages[{i}].steps", stage.steps, "must be > 0")
        for task in stage.tasks:
            _require(task in d.tasks, f"schedule.stages[{i}].tasks", list(stage.tasks), f"{task!r} is not in data.tasks={list(d.tasks)}")

    e = cfg.eval
    _require(e.split in SPLITS, "eval.split", e.split, f"must be one of {list(SPLITS)}")
    for key in ("n_examples", "batch_size", "max_new_tokens"):
        _require(isinstance(e[key], int) and e[key] > 0, f"eval.{key}", e[key], "must be a positive integer")
    _require(cfg.logger.mode in WANDB_MODES, "logger.mode", cfg.logger.mode, f"must be one of {list(WANDB_MODES)}")
    _require(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "must be auto, cpu or cuda")
    m = cfg.model
    _require(m.kind in MODEL_KINDS, "model.kind", m.kind, f"must be one of {list(MODEL_KINDS)}")
    _require(m.dtype in DTYPES, "model.dtype", m.dtype, f"must be one of {list(DTYPES)}")
