"""Turn the `data` config into named tasks with train/val/test splits.

A task named under `data.sources` is read from its dataset (`epi.data.sources`); any other
name in `data.tasks` is a built-in generated task.
"""

from __future__ import annotations

from omegaconf import DictConfig

from epi.data.format import EncodedTask, encode_task
from epi.data.sources import load_source_task
from epi.data.tasks import BUILTIN_TASKS, Task, make_builtin_task


def known_tasks(cfg: DictConfig) -> set[str]:
    return set(BUILTIN_TASKS) | set(cfg.sources or {})


def load_tasks(cfg: DictConfig) -> dict[str, Task]:
    """Tasks come from `data.seed`, not the run's seed, so every seed of a sweep sees the same eval set."""
    sources = cfg.sources or {}
    return {
        name: load_source_task(name, sources[name], cfg)
        if name in sources
        else make_builtin_task(name, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
        for name in cfg.tasks
    }


def encode_tasks(tokenizer, tasks: dict[str, Task], cfg: DictConfig) -> dict[str, EncodedTask]:
    """Every task's training rows fitted to `data.max_len` and its eval splits filtered alike (train.py and eval.py)."""
    return {name: encode_task(tokenizer, task, cfg.max_len, cfg.truncate) for name, task in tasks.items()}
