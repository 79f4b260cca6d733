"""A sweep's evidence, small enough to commit: `python eval.py runs=<sweep> archive=<dir>`.

A long experiment runs in chunks (a seed per session, say), and a chunk's run directories do not outlive
the machine they ran on: the model weights, checkpoints and W&B files are hundreds of MB per run. The
tables need none of them. They are computed from a run's small text files (config, metrics.jsonl,
eval_<split>.json, predictions_<split>.jsonl for the paired bootstrap, retention.json, CPI's groups.json,
.hydra/, error lines), so an archive holds exactly those, in the sweep's own layout, and
`python eval.py 'runs=[<archive of chunk 1>,<archive of chunk 2>,...]'` tabulates every chunk together,
with the same numbers a table over the original directories gives (tests/test_archive.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from epi.errors import UserError

EVIDENCE_SUFFIXES = (".yaml", ".json", ".jsonl", ".md", ".txt", ".log", ".csv")  # what report.py and plots.py read, and the logs
SKIPPED_DIRS = ("model", "wandb", "checkpoint.shards")  # weights, tokenizer files, W&B's own copy, sharded checkpoints


def check_destination(dest: Path) -> None:
    """Refuses a destination that already holds files (an earlier archive is never overwritten)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"archive={str(dest)!r} already exists and is not an empty directory; give a new one (nothing was written)")


def evidence_files(run_dir: Path) -> list[Path]:
    """A run directory's files the tables and plots are computed from, relative to it, in name order."""
    found = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and path.suffix in EVIDENCE_SUFFIXES and not any(part in SKIPPED_DIRS for part in rel.parts[:-1]):
            found.append(rel)
    return found


def archive_runs(run_dirs: list[Path], dest: Path) -> tuple[int, int]:
    """Copies each run's evidence to `dest`, keeping the runs' paths relative to their common parent (a
    sweep's job numbers stay its job numbers); returns (files, bytes). Written to `<dest>.partial` and
    renamed at the end, so an interrupted archive leaves no directory that looks complete."""
    check_destination(dest)
    if not run_dirs:
        raise UserError(f"archive={str(dest)!r}: no run directories to archive")
    root = Path(os.path.commonpath([p.resolve() for p in run_dirs]))
    if len(run_dirs) == 1:
        root = root.parent  # a single run keeps its own directory name
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    files = size = 0
    if (root / "multirun.yaml").is_file():  # the sweep's own record of its command and overrides
        partial.mkdir(parents=True)
        shutil.copy2(root / "multirun.yaml", partial / "multirun.yaml")
        files, size = 1, (partial / "multirun.yaml").stat().st_size
    for run_dir in run_dirs:
        for rel in evidence_files(run_dir):
            target = partial / run_dir.resolve().relative_to(root) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / rel, target)
            files, size = files + 1, size + target.stat().st_size
    if dest.exists():
        dest.rmdir()  # empty: check_destination said so
    partial.rename(dest)
    return files, size
