"""One training run, callable without Hydra: check the config, take the run directory, resume if asked, train,
evaluate, write the results. `train.py` wraps it in `@hydra.main`; tests call it in-process."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.types import RunMode
from omegaconf import OmegaConf, DictConfig

from epi import checkpoint, rundir
from epi.cli import write_results
from epi.config import validate
from epi.data.load import known_tasks
from epi.data.local import expand_root
from epi.distributed import slurm_task_cpus
from epi.errors import UserError
from epi.logging import carry_wandb_id, restore_metrics, short_name
from epi.rundir import rank_zero
from epi.trainer import Trainer


def train(cfg: DictConfig, run_dir: Path, hydra_record: Callable[[Path], None] | None = None) -> dict[str, dict[str, float]]:
    """One run into `run_dir`: check the config, take the directory, resume if asked, train, evaluate, write the results.

    Callable without Hydra (tests do); train.py's `main` only adds Hydra's run directory and run names, and its record
    (`hydra_record(run_dir)` writes .hydra/), which is written only once this run may use the directory.
    """
    cfg.data = expand_root(cfg.data)  # data=local: one task per folder under data.root
    run = validate(cfg, known_tasks(cfg.data))  # the typed config the run reads; `cfg` stays the record of it
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    run_dir = Path(run_dir)
    # Rank 0 alone locks and looks: it writes the run's files, and under torchrun it may already be restoring
    # metrics.jsonl into a new run directory while another rank would still be checking it (if rank 0 refuses, all
    # ranks stop).
    with rundir.hold(run_dir, lock=rank_zero()) as lock:
        auto = rundir.continues_in_place(cfg.resume)
        if auto and (done := rundir.finished_results(cfg, run_dir)) is not None:
            return done
        resume = rundir.resume_source(cfg.resume, run_dir, auto)
        if resume:
            rundir.refuse_finished(resume)
        source = checkpoint.find(resume) if resume else None
        in_place = source is not None and source.parent.resolve() == run_dir.resolve()
        taken = [name for name in rundir.RUN_FILES if (run_dir / name).exists()] if rank_zero() else []
        if taken and not in_place:
            if not auto:
                rundir.refuse_taken(run_dir, taken)
            rundir.same_run_or_refuse(cfg, run_dir, "a run with no checkpoint")
        resume_state = checkpoint.load(resume) if source is not None else None
        if resume_state is not None:
            if changed := rundir.changed_settings(resume_state["config"], cfg):
                raise UserError(
                    f"resume={cfg.resume!r}: the checkpoint {source} was trained with different {changed}; resume with the "
                    "same settings, or start a new run in a new directory (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep)."
                )
        # From here on this run owns the directory: nothing above wrote to it.
        lock.claim()
        if rank_zero():
            if hydra_record is not None:
                hydra_record(run_dir)
            if taken and not in_place:
                rundir.replace_attempt(run_dir)
        if resume_state is not None and rank_zero():
            if not restore_metrics(source.parent / rundir.METRICS, run_dir / rundir.METRICS, resume_state["metrics_lines"]):
                print(f"warning: {source.parent / rundir.METRICS} lacks the events before step {resume_state['step']}; this run's {rundir.METRICS} starts at the resume")
            if auto:
                (run_dir / rundir.ERROR).unlink(missing_ok=True)  # an earlier attempt's failure, not this run's
            if not in_place:
                carry_wandb_id(source.parent, run_dir)
            print(f"resuming {source} at step {resume_state['step']}")
        trainer = Trainer(run, run_dir, resume_state)
        writer = trainer.rank == 0  # under torchrun, rank 0 writes the run's files
        if writer:
            (run_dir / rundir.CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        results = trainer.fit()
        if writer:
            scorers = {name: task.scorer for name, task in trainer.tasks.items()}
            title = f"{short_name(cfg.logger.name or 'run')} ({cfg.eval.split} split, {run_dir})"
            print(write_results(run_dir, cfg.eval.split, results, scorers, title, trainer.predictions))
            if not run.keep_checkpoint:  # the run is complete: nothing is left to resume
                checkpoint.remove(run_dir)  # checkpoint.pt, and checkpoint.shards/ under parallel=fsdp
        return results


def auto_threads(hc: Any) -> int:
    """Torch threads for one job: the cores this process may use, shared by the jobs that run at once
    (the joblib launcher's n_jobs in a sweep, the local ranks under torchrun), so they do not thrash.

    A task SLURM started (hydra/launcher=slurm_*, srun) owns its cpus_per_task already, whether or not SLURM also
    pinned it to them: it takes those, and is not divided again by the other tasks on its node."""
    cores = len(os.sched_getaffinity(0))
    jobs = hc.launcher.get("n_jobs", 1) if hc.mode == RunMode.MULTIRUN else 1
    jobs = cores if jobs is None or jobs < 1 else jobs  # joblib: -1 means one job per core
    task_cpus = slurm_task_cpus()
    if task_cpus is not None:
        cores = min(cores, task_cpus)
    else:
        jobs *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // min(jobs, cores))
