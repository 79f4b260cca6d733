"""One run per directory: the lock a run holds for its whole life, and the Hydra record written only once it may run.

Two runs started into one directory would interleave their events in metrics.jsonl and overwrite each
other's model; so a run takes an exclusive `fcntl.flock` on `run.lock` in its directory before it
looks at or writes anything there, and keeps it until the process ends. The OS releases a flock when
its process dies, so a SIGKILLed or preempted run leaves no stale lock and its SLURM requeue (or a
`resume=auto`) takes the directory straight back. The file stays behind: it holds the last holder's
pid and host, which is what a refused run names. Only rank 0 of a torchrun/SLURM job locks (the other
ranks write nothing of the run's own).

Hydra writes `.hydra/{config,hydra,overrides}.yaml` before the task function runs, which would let a
run that is then refused (the directory holds a finished run, or another run holds the lock) rewrite
the record of the run that is there. conf/config.yaml therefore sets `hydra.output_subdir: null`, and
train.py hands the same three files to `write_hydra_record` once the run has the directory.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from epi.errors import RunDirTaken

# Every file a run writes or reads in its directory, spelled here once (tests/test_layout.py checks no other
# module spells one). Writers and readers (the trainer, the logger, checkpoints, eval.py's report) import these.
CONFIG = "config.yaml"            # the resolved config the run trained with
METRICS = "metrics.jsonl"         # one event per line: {step, split, task, metric, value}
MODEL = "model"                   # the final Hugging Face model (save_pretrained)
CHECKPOINT = "checkpoint.pt"      # the latest checkpoint; removed once the run finished unless schedule.keep_checkpoint
SHARDS = "checkpoint.shards"      # parallel=fsdp: beside checkpoint.pt, one directory per saved step
ERROR = "error.txt"               # a sweep job that failed: its one error line
LOG = "train.log"                 # Hydra's job log (stdout and stderr of the run)
LOCK = "run.lock"                 # held by the run for its life: one run per directory
WANDB_ID = "wandb_id"             # the W&B run id a resumed or requeued attempt continues
RETENTION = "retention.json"      # general-text perplexity before and after (eval.retention)
CPI_DIR = "cpi"                   # CPI's artifacts: groups.json, overlap.json, ...
HYDRA_RECORD = ".hydra"           # Hydra's own name for it: the report and the archives read it there
HYDRA_CONFIG, HYDRA_FILE, HYDRA_OVERRIDES = "config.yaml", "hydra.yaml", "overrides.yaml"  # inside HYDRA_RECORD
# Files that mark a directory as holding a run: a new run there would mix its events into the old one's.
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, MODEL)
# What an attempt that stopped before its first checkpoint leaves besides .hydra/ and wandb/: resume=auto starts
# the run afresh and removes them, since they describe that attempt (config.yaml is rewritten anyway).
ATTEMPT_FILES = (METRICS, ERROR)


def eval_results(split: str) -> str:
    """The final scores of a split, per task (what marks a run as finished)."""
    return f"eval_{split}.json"


def eval_table(split: str) -> str:
    return f"eval_{split}.md"


def predictions(split: str) -> str:
    """One line per evaluated example: prompt, reference, prediction, score (the paired tests read these)."""
    return f"predictions_{split}.jsonl"


def artifact(name: str) -> str:
    """A strategy's JSON artifact (`cpi/groups`, ...), as the context writes it."""
    return f"{name}.json"


class RunLock:
    """A held lock on a run directory; `claim` writes who holds it, once the run is sure to use the directory."""

    def __init__(self, fd: int | None):
        self._fd = fd  # None: a rank that does not lock

    def claim(self) -> None:
        """Record this process as the holder, for the line a second run prints. Not done at `hold` time, so that
        a run refused after locking (the directory holds a finished run) leaves the file as it found it."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        os.fsync(self._fd)


@contextmanager
def hold(run_dir: Path, lock: bool = True) -> Iterator[RunLock]:
    """The run directory, created if new, locked for the `with` block (or not, for `lock=False`: ranks > 0)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not lock:
        yield RunLock(None)
        return
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "a process that is just starting"
            raise RunDirTaken(
                f"{run_dir} is in use by another run ({holder}, holding {path}); one directory holds one run. Wait for "
                "it to end, or start this run in another directory (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep)."
            ) from None
        yield RunLock(fd)
    finally:
        os.close(fd)  # releases the lock


def write_hydra_record(run_dir: Path, task: DictConfig, hydra: DictConfig, overrides: list[str]) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` as Hydra itself writes them (unresolved)."""
    record = Path(run_dir) / HYDRA_RECORD
    record.mkdir(parents=True, exist_ok=True)
    for name, node in ((HYDRA_CONFIG, task), (HYDRA_FILE, OmegaConf.create({"hydra": hydra})),
                       (HYDRA_OVERRIDES, OmegaConf.create(list(overrides)))):
        tmp = record / f"{name}.tmp"
        OmegaConf.save(node, tmp)
        tmp.replace(record / name)
