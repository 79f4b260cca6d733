"""The run directory's one owner: the names of its files, the lock a run holds, the Hydra record, the resume policy
(what a directory may hold when a run starts there, and what it continues), the results a run writes, and run names.

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
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from epi.distributed import requeued
from epi.errors import RunDirTaken

# Every file a run writes or reads in its directory, spelled here once (tests/test_layout.py checks no other
# module spells one). Writers and readers (the trainer, the logger, checkpoints, eval.py's report) import these.
CONFIG = "config.yaml"            # the resolved config the run trained with
METRICS = "metrics.jsonl"         # one event per line: {step, split, task, metric, value}
MODEL = "model"                   # the final Hugging Face model (save_pretrained)
CHECKPOINT = "checkpoint.pt"      # the latest checkpoint; removed once the run finished unless keep_checkpoint
SHARDS = "checkpoint.shards"      # parallel=fsdp: beside checkpoint.pt, one directory per saved step
ERROR = "error.txt"               # a sweep job that failed: its one error line
LOG = "train.log"                 # Hydra's job log (stdout and stderr of the run)
LOCK = "run.lock"                 # held by the run for its life: one run per directory
WANDB_ID = "wandb_id"             # the W&B run id a resumed or requeued attempt continues
RETENTION = "retention.json"      # general-text perplexity before and after (eval.retention)
GENERAL = "general.json"          # the general checks (eval.general.tasks) before and after training
GENERAL_TABLE = "general.md"      # ... and their tables
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


def predictions(split: str, after_stage: int | None = None) -> str:
    """One line per evaluated example: prompt, reference, prediction, score (the paired tests read these); with
    `after_stage=k`, the evaluation at the end of stage k of a sequential run (the per-example forgetting reads these)."""
    return f"predictions_{split}.jsonl" if after_stage is None else f"predictions_{split}_after_stage{after_stage}.jsonl"


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


# ---- resume policy ----------------------------------------------------------------------------------------------

# resume=auto: continue this run directory's own checkpoint if it has one, else start the run there. What a SLURM
# requeue does by default, and what makes one command both start a sweep and, run again, complete it.
AUTO = "auto"
# Sections of the config a resumed run must share with its checkpoint.
RESUME_MUST_MATCH = ("model", "data", "strategy", "schedule", "optimizer", "isolation", "seed")
# Keys inside them that decide whether a model directory's code may run, not what it trains: a resume may change
# them, and a checkpoint written before they existed still resumes. (keep_checkpoint, a top-level key, may differ too.)
RESUME_MAY_DIFFER = {"model": ("trust_remote_code",)}


def rank_zero() -> bool:
    """Whether this process writes the run's files: rank 0 under torchrun or SLURM tasks, and a plain run."""
    return int(os.environ.get("RANK", "0")) == 0


def continues_in_place(resume: str | None) -> bool:
    """Whether this run continues whatever its directory holds of it: resume=auto, or a job SLURM requeued (after a
    preemption, or submitit's after a time-out), whose command is the first attempt's and cannot say so."""
    return resume == AUTO or requeued()


def resume_source(resume: str | None, run_dir: Path, auto: bool) -> str | None:
    """What to load: with `auto`, the run directory's own checkpoint if it has one, else the checkpoint `resume`
    names (a requeued job whose first attempt resumed another run's and had not written its own yet), else
    nothing; without it, `resume` as given."""
    if not auto:
        return resume
    if (run_dir / CHECKPOINT).is_file():
        return str(run_dir)
    return None if resume in (None, AUTO) else resume


def trained_settings(config: dict[str, Any], section: str) -> Any:
    """`config[section]` as far as it decides what a run trains: without its RESUME_MAY_DIFFER keys."""
    value = config.get(section)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in RESUME_MAY_DIFFER.get(section, ())}
    return value


def changed_settings(saved: dict[str, Any], cfg: DictConfig) -> list[str]:
    """The RESUME_MUST_MATCH sections in which `cfg` trains something else than the `saved` config did."""
    now = OmegaConf.to_container(cfg, resolve=True)
    return [k for k in RESUME_MUST_MATCH if trained_settings(saved, k) != trained_settings(now, k)]


def same_run_or_refuse(cfg: DictConfig, run_dir: Path, what: str) -> None:
    """resume=auto continues only its own run: the one whose config.yaml in `run_dir` trains what `cfg` trains."""
    path = run_dir / CONFIG
    if not path.is_file():
        return
    if changed := changed_settings(OmegaConf.to_container(OmegaConf.load(path), resolve=True), cfg):
        raise RunDirTaken(
            f"resume={AUTO}: {run_dir} holds {what} trained with different {changed} ({path}); continue it with its own "
            "settings, or start this run in a new directory (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep)."
        )


def refuse_taken(run_dir: Path, taken: list[str]) -> None:
    """A new run in a directory that holds one would mix its events into the old one's."""
    raise RunDirTaken(
        f"{run_dir} already holds a run ({', '.join(taken)}); a new run there would mix with it. Use a new "
        f"directory (hydra.run.dir=...), or continue that run with resume={run_dir} hydra.run.dir={run_dir} "
        f"(or resume={AUTO})."
    )


def finished_results(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, float]] | None:
    """The results of this run if `run_dir` holds it finished (model/ and its results written, checkpoint removed),
    else None. Nothing is trained or written again: a finished job of a sweep started again with resume=auto, or
    requeued after it finished, is complete."""
    if (run_dir / CHECKPOINT).exists() or not (run_dir / MODEL).is_dir() or not any(run_dir.glob(eval_results("*"))):
        return None
    same_run_or_refuse(cfg, run_dir, "a finished run")
    results = run_dir / eval_results(cfg.eval.split)
    if not results.is_file():
        raise RunDirTaken(
            f"resume={AUTO}: {run_dir} holds this run, finished and evaluated on another split than eval.split="
            f"{cfg.eval.split}; evaluate it on that split with eval.py run_dir={run_dir} eval.split={cfg.eval.split}."
        )
    if rank_zero():
        print(f"{run_dir} holds this run, finished ({results.name} written); nothing to do (resume={AUTO})")
    return json.loads(results.read_text())


def refuse_finished(resume: str) -> None:
    """A run that finished removed its checkpoint (keep_checkpoint=false): resuming it says so in
    one line, instead of only that the file is missing."""
    path = Path(resume)
    run = path.parent if path.name == CHECKPOINT else path
    results = sorted(run.glob(eval_results("*")))
    if (run / CHECKPOINT).exists() or not (run / MODEL).is_dir() or not results:
        return
    raise RunDirTaken(
        f"resume={resume!r}: {run} holds a run that already finished (model/ and {results[0].name} written), and "
        f"its {CHECKPOINT} was removed then (keep_checkpoint=false); there is nothing left to "
        f"resume. Evaluate it with eval.py run_dir={run}, or train further from its weights as a new run: "
        f"model=hf model.name_or_path={run / MODEL} hydra.run.dir=<a new directory>."
    )


def replace_attempt(run_dir: Path) -> None:
    """resume=auto in a directory whose earlier attempt of this run stopped before its first checkpoint: nothing
    there can be continued, so the run starts afresh and that attempt's events are removed (by rank 0, once this
    run holds the directory; `same_run_or_refuse` checked first that it is this run's). The W&B run id stays: the
    new attempt continues the same W&B run."""
    for name in ATTEMPT_FILES:
        (run_dir / name).unlink(missing_ok=True)
    print(f"resume={AUTO}: {run_dir} has no {CHECKPOINT} yet (an earlier attempt stopped before its first); starting the run afresh there")


# ---- results and names ------------------------------------------------------------------------------------------


def write_results(out_dir: Path, split: str, results: dict[str, dict[str, float]], table: str,
                  predictions_: list[dict] | None = None) -> None:
    """eval_<split>.json and its markdown `table` next to each other, and predictions_<split>.jsonl (one line per
    evaluated example: task, prompt, reference, prediction, score, loss) so any number can be audited without code."""
    (out_dir / eval_results(split)).write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / eval_table(split)).write_text(table + "\n")
    if predictions_ is not None:
        write_predictions(out_dir, predictions(split), predictions_)


def write_predictions(out_dir: Path, name: str, records: list[dict]) -> None:
    """`records` as JSON lines in `out_dir/name`, written to a temporary file and renamed into place: a run killed
    while writing leaves the earlier file whole."""
    tmp = out_dir / f".{name}.tmp"
    tmp.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    os.replace(tmp, out_dir / name)


# Overrides that decide where a run's results go and how fast it runs, not what it trains: runs that differ
# only in these are seeds of one setting (a sweep continued with logger=jsonl, or on a machine with more cores).
BOOKKEEPING = ("logger.", "logger=", "threads=")


def is_bookkeeping(override: str) -> bool:
    return override.lstrip("+~").startswith(BOOKKEEPING)


def run_name(overrides: list[str], drop: tuple[str, ...] = ()) -> str:
    """Readable W&B name from the command-line overrides, e.g. "strategy=epi,seed=1"."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in drop]
    return ",".join(keep) or "default"


def setting_name(overrides: list[str]) -> str:
    """A run's setting (its W&B group, a row of eval.py's report): its overrides without the seed and the
    bookkeeping ones, so that the seeds of one setting are averaged together."""
    return run_name([o for o in overrides if not is_bookkeeping(o)], drop=("seed",))
