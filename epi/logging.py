"""Metrics go to `metrics.jsonl` (always) and to W&B (when enabled) through one small interface.

Each jsonl line is one event: {"step", "split", "task", "metric", "value"}; `task` is null for
run-level numbers. W&B is a mirror: if it fails, training goes on and the jsonl stays complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import shutil
import string
import warnings
from pathlib import Path
from typing import Any

from epi.rundir import METRICS, WANDB_ID

WANDB_MODES = ("offline", "online", "disabled")
SHORT_NAME = 64  # characters of a W&B run or group name; the full overrides stay in the run's config
# WANDB_ID: the run directory's W&B run id, written when W&B first starts there: every later attempt of the run (a
# resume, a SLURM requeue) continues that W&B run instead of opening a second one under the same name.


def short_name(text: str, limit: int = SHORT_NAME) -> str:
    """`text` if it fits, else its start and a hash of all of it: readable on a dashboard, still unique."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 9]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"


class RunLogger:
    def __init__(
        self,
        run_dir: Path | None,
        *,
        mode: str,
        project: str,
        name: str,
        group: str,
        config: dict[str, Any],
        tags: list[str] | None = None,
    ):
        # run_dir=None: a silent logger (data-parallel ranks other than 0)
        self._file = None
        # While a resumed run rebuilds itself (data statistics, a strategy's prepare), what it logs was logged before
        # the checkpoint, and metrics.jsonl already holds it: the trainer mutes the logger until the state is loaded.
        self.muted = False
        self.lines = 0  # events in metrics.jsonl, a resume's restored ones included: checkpoints record it
        if run_dir is not None:
            path = Path(run_dir) / METRICS
            self.lines = _count_lines(path)
            self._file = path.open("a", encoding="utf-8")
        self._wandb = None
        if mode != "disabled":
            self._wandb = self._guard(
                "init",
                lambda: __import__("wandb").init(
                    mode=mode,
                    project=project,
                    name=short_name(name),
                    group=short_name(group),
                    config=config,
                    tags=tags or [],
                    dir=str(run_dir),
                    reinit="finish_previous",
                    id=wandb_id(Path(run_dir)) if run_dir is not None else None,
                    resume="allow",  # the id's run if W&B has it (an earlier attempt), else a new run with that id
                ),
            )

    def log(self, step: int, split: str, metrics: dict[str, float], task: str | None = None) -> None:
        """Log `metrics` of one split (and task) at `step`."""
        if self.muted:
            return
        if self._file is not None:
            for metric, value in metrics.items():
                event = {"step": step, "split": split, "task": task, "metric": metric, "value": _plain(value)}
                self._file.write(json.dumps(event) + "\n")
                self.lines += 1
            self._file.flush()
        if self._wandb is not None:
            prefix = f"{split}/{task}/" if task else f"{split}/"
            self._guard("log", lambda: self._wandb.log({prefix + k: _plain(v) for k, v in metrics.items()}, step=step))

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self._wandb is not None:
            import wandb

            self._guard("table", lambda: self._wandb.log({key: wandb.Table(columns=columns, data=rows)}))

    def image(self, key: str, path: Path) -> None:
        if self._wandb is not None:
            import wandb

            self._guard("image", lambda: self._wandb.log({key: wandb.Image(str(path))}))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._guard("finish", self._wandb.finish)
            self._wandb = None

    def _guard(self, what: str, fn):
        """A W&B failure costs a warning, never the run."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any W&B error must not stop training
            warnings.warn(f"W&B {what} failed ({type(e).__name__}: {e}); continuing with metrics.jsonl only")
            self._wandb = None
            return None


def wandb_id(run_dir: Path) -> str:
    """The W&B run id kept in `run_dir` (WANDB_ID), or a new one kept there from now on. Written before W&B starts,
    so even an attempt killed during wandb.init leaves the id its requeue will continue."""
    path = Path(run_dir) / WANDB_ID
    if path.is_file() and (kept := path.read_text(encoding="utf-8").strip()):
        return kept
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's own id alphabet
    tmp = path.with_name(WANDB_ID + ".tmp")
    tmp.write_text(new + "\n", encoding="utf-8")
    tmp.replace(path)
    return new


def carry_wandb_id(source: Path, target: Path) -> None:
    """A run resumed into a new directory continues the W&B run of the directory it resumed from, as its
    metrics.jsonl continues that directory's events."""
    kept, new = Path(source) / WANDB_ID, Path(target) / WANDB_ID
    if kept.is_file() and not new.exists():
        shutil.copyfile(kept, new)


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the event readable
    return value


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def restore_metrics(source: Path, target: Path, lines: int) -> bool:
    """A resumed run's metrics.jsonl: the first `lines` events of the checkpointed run's, and nothing after.

    Events logged after the checkpoint (by the run that crashed) are dropped, because the resumed
    run logs them again. `source` and `target` may be the same file (resuming in place); the new
    file replaces the old one atomically. Returns False when `source` has fewer lines than that.
    """
    if not source.is_file():
        return False
    with source.open(encoding="utf-8") as f:
        kept = [line for _, line in zip(range(lines), f)]
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(target)
    return len(kept) == lines


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
