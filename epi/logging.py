"""Metrics go to `metrics.jsonl` (always) and to W&B (when enabled) through one small interface.

Each jsonl line is one event: {"step", "split", "task", "metric", "value"}; `task` is null for
run-level numbers. W&B is a mirror: if it fails, training goes on and the jsonl stays complete.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")


class RunLogger:
    def __init__(
        self,
        run_dir: Path | None,
        *,
        wandb_mode: str,
        project: str,
        name: str,
        group: str,
        config: dict[str, Any],
        tags: list[str] | None = None,
    ):
        # run_dir=None: a silent logger (data-parallel ranks other than 0)
        self._file = (Path(run_dir) / "metrics.jsonl").open("a", encoding="utf-8") if run_dir is not None else None
        self._wandb = None
        if wandb_mode != "disabled":
            self._wandb = self._guard(
                "init",
                lambda: __import__("wandb").init(
                    mode=wandb_mode,
                    project=project,
                    name=name,
                    group=group,
                    config=config,
                    tags=tags or [],
                    dir=str(run_dir),
                    reinit="finish_previous",
                ),
            )

    def log(self, step: int, split: str, metrics: dict[str, float], task: str | None = None) -> None:
        """Log `metrics` of one split (and task) at `step`."""
        if self._file is not None:
            for metric, value in metrics.items():
                event = {"step": step, "split": split, "task": task, "metric": metric, "value": _plain(value)}
                self._file.write(json.dumps(event) + "\n")
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


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the event readable
    return value


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
