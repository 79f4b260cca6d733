"""Turn the `data` config into named tasks with train/val/test splits."""

from __future__ import annotations

from omegaconf import DictConfig

from epi.data.tasks import BUILTIN_TASKS, Task, make_builtin_task


def known_tasks(cfg: DictConfig) -> set[str]:
    return set(BUILTIN_TASKS)


def load_tasks(cfg: DictConfig) -> dict[str, Task]:
    """Tasks are generated from `data.seed`, not the run's seed, so every seed of a sweep sees the same eval set."""
    return {
        name: make_builtin_task(name, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
        for name in cfg.tasks
    }
