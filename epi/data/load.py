"""Turn the `data` config into named tasks with train/val/test splits.

A task named under `data.sources` is read from its dataset (`epi.data.sources`); any other
name in `data.tasks` is a built-in generated task. The general checks (`eval.general.tasks`,
epi.general) are read the same way, from `data.sources` or the shipped conf/data/task/*.yaml.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from epi.data.format import EncodedTask, encode_task, with_system_prompt
from epi.data.sources import load_source_task
from epi.data.tasks import BUILTIN_TASKS, Task, make_builtin_task
from epi.errors import UserError
from epi.schema import fail

TASK_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "data" / "task"  # the shipped task configs


def known_tasks(cfg: DictConfig) -> set[str]:
    return set(BUILTIN_TASKS) | set(cfg.sources or {})


def load_tasks(cfg: DictConfig) -> dict[str, Task]:
    """Tasks come from `data.seed`, not the run's seed, so every seed of a sweep sees the same eval set.

    `data.system_prompt` is applied here, after the splits are drawn (so they do not depend on it), and
    train.py and eval.py both load through here: training rows, generation prompts, response loss and
    contamination all see the same conversations.
    """
    sources = cfg.sources or {}
    tasks = {
        name: load_source_task(name, sources[name], cfg)
        if name in sources
        else make_builtin_task(name, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
        for name in cfg.tasks
    }
    system = cfg.get("system_prompt")  # absent from a data config written before the key: leave them alone
    if system is None:
        return tasks
    if not isinstance(system, str):  # eval.py loads without train.py's schema check
        raise fail("data.system_prompt", system, "must be a string or null (\"\" for an empty system turn)")
    return {name: _with_system_prompt(task, system) for name, task in tasks.items()}


def general_source(name: str, data: DictConfig) -> DictConfig:
    """The task config of a general check: `data.sources.<name>` if the data config has one, else conf/data/task/<name>.yaml."""
    sources = data.get("sources") or {}
    if name in sources:
        return sources[name]
    path = TASK_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TASK_CONFIGS.glob("*.yaml"))
        raise UserError(f"eval.general.tasks: {name!r} is neither data.sources.{name} nor a task config in conf/data/task/ "
                        f"(there: {known})")
    return OmegaConf.load(path)


def load_general(names: list[str], data: DictConfig) -> dict[str, Task]:
    """The general checks' tasks, read as `data` reads its own (data.seed, n_<split>, system_prompt)."""
    if not names:
        return {}
    sources = {name: OmegaConf.to_container(general_source(name, data), resolve=True) for name in names}
    plain = OmegaConf.create(OmegaConf.to_container(data, resolve=True))  # a plain copy: Hydra's struct flag refuses new sources
    return load_tasks(OmegaConf.merge(plain, {"tasks": list(names), "sources": sources}))


def _with_system_prompt(task: Task, system: str) -> Task:
    """Every example of every split without a system turn gets ("system", `system`) first (data.system_prompt)."""
    return replace(task, splits={split: [with_system_prompt(ex, system) for ex in examples] for split, examples in task.splits.items()})


def encode_tasks(tokenizer, tasks: dict[str, Task], cfg: DictConfig) -> dict[str, EncodedTask]:
    """Every task's training rows fitted to `data.max_len` and its eval splits filtered alike (train.py and eval.py)."""
    return {name: encode_task(tokenizer, task, cfg.max_len, cfg.truncate) for name, task in tasks.items()}


def format_stats(stats: dict[str, dict[str, int]], max_len: int, truncate: str) -> str:
    """One line per task: training examples and tokens after fitting data.max_len, and what that cost."""
    lines = [f"data (max_len={max_len}, truncate={truncate}):"]
    for task, s in stats.items():
        lines.append(
            f"  {task}: {s['examples']} train examples, {s['tokens']} tokens ({s['trained_tokens']} trained); "
            f"{s['truncated']} truncated, {s['dropped']} dropped; val/test dropped {s['val_dropped']}/{s['test_dropped']}"
        )
    return "\n".join(lines)
