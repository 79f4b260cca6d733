"""Fine-tune on a task mixture with an isolation strategy: `python train.py [overrides]`, `-m` for sweeps."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from epi import checkpoint, rundir
from epi.cli import exit_on_user_error, run_name, setting_name, write_results
from epi.config import validate
from epi.data.load import known_tasks
from epi.data.local import expand_root
from epi.distributed import export_launcher_env, requeued, slurm_task_cpus
from epi.errors import RunDirTaken, UserError
from epi.evaluate import average
from epi.logging import METRICS, carry_wandb_id, restore_metrics, short_name
from epi.trainer import Trainer

# Sections of the config a resumed run must share with its checkpoint.
RESUME_MUST_MATCH = ("model", "data", "strategy", "schedule", "seed")
# Keys inside them that decide which files a finished run keeps or whether a model directory's code may run, not what
# it trains: a resume may change them, and a checkpoint written before they existed still resumes.
RESUME_MAY_DIFFER = {"schedule": ("keep_checkpoint",), "model": ("trust_remote_code",)}
# Files that mark a directory as holding a run: a new run there would mix its events into the old one's.
RUN_FILES = ("config.yaml", METRICS, checkpoint.FILENAME, "model")
# resume=auto: continue this run directory's own checkpoint if it has one, else start the run there. What a SLURM
# requeue does by default, and what makes one command both start a sweep and, run again, complete it.
AUTO = "auto"
# What an attempt that stopped before its first checkpoint leaves besides .hydra/ and wandb/: resume=auto starts
# the run afresh and removes them, since they describe that attempt (config.yaml is rewritten anyway).
ATTEMPT_FILES = (METRICS, "error.txt")


def train(cfg: DictConfig, run_dir: Path, hydra_record: Callable[[Path], None] | None = None) -> dict[str, dict[str, float]]:
    """One run into `run_dir`: check the config, take the directory, resume if asked, train, evaluate, write the results.

    Callable without Hydra (tests do); `main` below only adds Hydra's run directory and run names, and its record
    (`hydra_record(run_dir)` writes .hydra/), which is written only once this run may use the directory.
    """
    cfg.data = expand_root(cfg.data)  # data=local: one task per folder under data.root
    validate(cfg, known_tasks(cfg.data))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    # Rank 0 alone locks and looks: it writes the run's files, and under torchrun it may already be restoring
    # metrics.jsonl into a new run directory while another rank would still be checking it (if rank 0 refuses, all
    # ranks stop).
    with rundir.hold(run_dir, lock=rank_zero()) as lock:
        auto = continues_in_place(cfg.resume)
        if auto and (done := finished_results(cfg, run_dir)) is not None:
            return done
        resume = resume_source(cfg.resume, run_dir, auto)
        if resume:
            refuse_finished(resume)
        source = checkpoint.find(resume) if resume else None
        in_place = source is not None and source.parent.resolve() == run_dir.resolve()
        taken = [name for name in RUN_FILES if (run_dir / name).exists()] if rank_zero() else []
        if taken and not in_place:
            if not auto:
                raise RunDirTaken(
                    f"{run_dir} already holds a run ({', '.join(taken)}); a new run there would mix with it. Use a new "
                    f"directory (hydra.run.dir=...), or continue that run with resume={run_dir} hydra.run.dir={run_dir} "
                    f"(or resume={AUTO})."
                )
            same_run_or_refuse(cfg, run_dir, "a run with no checkpoint")
        resume_state = checkpoint.load(resume) if source is not None else None
        if resume_state is not None:
            saved, now = resume_state["config"], OmegaConf.to_container(cfg, resolve=True)
            changed = [k for k in RESUME_MUST_MATCH if trained_settings(saved, k) != trained_settings(now, k)]
            if changed:
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
                replace_attempt(run_dir)
        if resume_state is not None and rank_zero():
            if not restore_metrics(source.parent / METRICS, run_dir / METRICS, resume_state["metrics_lines"]):
                print(f"warning: {source.parent / METRICS} lacks the events before step {resume_state['step']}; this run's {METRICS} starts at the resume")
            if auto:
                (run_dir / "error.txt").unlink(missing_ok=True)  # an earlier attempt's failure, not this run's
            if not in_place:
                carry_wandb_id(source.parent, run_dir)
            print(f"resuming {source} at step {resume_state['step']}")
        trainer = Trainer(cfg, run_dir, resume_state)
        writer = trainer.rank == 0  # under torchrun, rank 0 writes the run's files
        if writer:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        results = trainer.fit()
        if writer:
            scorers = {name: task.scorer for name, task in trainer.tasks.items()}
            title = f"{short_name(cfg.logger.name or 'run')} ({cfg.eval.split} split, {run_dir})"
            print(write_results(run_dir, cfg.eval.split, results, scorers, title, trainer.predictions))
            if not cfg.schedule.keep_checkpoint:  # the run is complete: nothing is left to resume
                checkpoint.remove(run_dir)  # checkpoint.pt, and checkpoint.shards/ under parallel=fsdp
        return results


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
    if (run_dir / checkpoint.FILENAME).is_file():
        return str(run_dir)
    return None if resume in (None, AUTO) else resume


def same_run_or_refuse(cfg: DictConfig, run_dir: Path, what: str) -> None:
    """resume=auto continues only its own run: the one whose config.yaml in `run_dir` trains what `cfg` trains."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved, now = OmegaConf.to_container(OmegaConf.load(path), resolve=True), OmegaConf.to_container(cfg, resolve=True)
    changed = [k for k in RESUME_MUST_MATCH if trained_settings(saved, k) != trained_settings(now, k)]
    if changed:
        raise RunDirTaken(
            f"resume={AUTO}: {run_dir} holds {what} trained with different {changed} ({path}); continue it with its own "
            "settings, or start this run in a new directory (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep)."
        )


def finished_results(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, float]] | None:
    """The results of this run if `run_dir` holds it finished (model/ and its results written, checkpoint removed),
    else None. Nothing is trained or written again: a finished job of a sweep started again with resume=auto, or
    requeued after it finished, is complete."""
    if (run_dir / checkpoint.FILENAME).exists() or not (run_dir / "model").is_dir() or not any(run_dir.glob("eval_*.json")):
        return None
    same_run_or_refuse(cfg, run_dir, "a finished run")
    results = run_dir / f"eval_{cfg.eval.split}.json"
    if not results.is_file():
        raise RunDirTaken(
            f"resume={AUTO}: {run_dir} holds this run, finished and evaluated on another split than eval.split="
            f"{cfg.eval.split}; evaluate it on that split with eval.py run_dir={run_dir} eval.split={cfg.eval.split}."
        )
    if rank_zero():
        print(f"{run_dir} holds this run, finished ({results.name} written); nothing to do (resume={AUTO})")
    return json.loads(results.read_text())


def replace_attempt(run_dir: Path) -> None:
    """resume=auto in a directory whose earlier attempt of this run stopped before its first checkpoint: nothing
    there can be continued, so the run starts afresh and that attempt's events are removed (by rank 0, once this
    run holds the directory; `same_run_or_refuse` checked first that it is this run's). The W&B run id stays: the
    new attempt continues the same W&B run."""
    for name in ATTEMPT_FILES:
        (run_dir / name).unlink(missing_ok=True)
    print(f"resume={AUTO}: {run_dir} has no {checkpoint.FILENAME} yet (an earlier attempt stopped before its first); starting the run afresh there")


def rank_zero() -> bool:
    """Whether this process writes the run's files: rank 0 under torchrun or SLURM tasks, and a plain run."""
    return int(os.environ.get("RANK", "0")) == 0


def trained_settings(config: dict[str, Any], section: str) -> Any:
    """`config[section]` as far as it decides what a run trains: without its RESUME_MAY_DIFFER keys."""
    value = config.get(section)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in RESUME_MAY_DIFFER.get(section, ())}
    return value


def refuse_finished(resume: str) -> None:
    """A run that finished removed its checkpoint (schedule.keep_checkpoint=false): resuming it says so in
    one line, instead of only that the file is missing."""
    path = Path(resume)
    run = path.parent if path.name == checkpoint.FILENAME else path
    results = sorted(run.glob("eval_*.json"))
    if (run / checkpoint.FILENAME).exists() or not (run / "model").is_dir() or not results:
        return
    raise RunDirTaken(
        f"resume={resume!r}: {run} holds a run that already finished (model/ and {results[0].name} written), and "
        f"its {checkpoint.FILENAME} was removed then (schedule.keep_checkpoint=false); there is nothing left to "
        f"resume. Evaluate it with eval.py run_dir={run}, or train further from its weights as a new run: "
        f"model=hf model.name_or_path={run / 'model'} hydra.run.dir=<a new directory>."
    )


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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    task_config = copy.deepcopy(cfg)  # as composed: what Hydra would have written to .hydra/config.yaml
    export_launcher_env()  # SLURM/submitit tasks: RANK, LOCAL_WORLD_SIZE, ... as torchrun sets them, read below
    if cfg.threads is None:
        cfg.threads = auto_threads(hc)  # recorded in config.yaml
    overrides = [o for o in hc.overrides.task if not o.startswith("resume=")]
    cfg.logger.name = cfg.logger.name or run_name(overrides)
    cfg.logger.group = cfg.logger.group or setting_name(overrides)
    run_dir = Path(hc.runtime.output_dir)
    try:
        results = train(cfg, run_dir, lambda d: rundir.write_hydra_record(d, task_config, hc, hc.overrides.task))
    except Exception as e:
        if hc.mode != RunMode.MULTIRUN:
            raise  # one run: one line on stderr (a UserError) or the traceback of a bug, and its exit code
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        if rank_zero() and not isinstance(e, RunDirTaken):  # what eval.py runs= lists for a job that did not finish; a
            # job refused because its directory holds another run leaves that run's files as they are
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(f"error: {message}\n")
            if not (run_dir / rundir.HYDRA_RECORD).exists():  # a job refused before it held its (new) directory:
                # its overrides name it in eval.py's list; an existing run's record is never replaced
                rundir.write_hydra_record(run_dir, task_config, hc, hc.overrides.task)
        if not isinstance(e, UserError):
            raise
        recorded = "its directory was left as it was" if isinstance(e, RunDirTaken) else f"recorded as failed in {run_dir / 'error.txt'}"
        print(f"error: {message} (job {hc.job.num} {recorded}; the sweep goes on)", file=sys.stderr)
        return None
    return average(results).get("score")  # the sweeper's objective; None when every task is scored by perplexity


if __name__ == "__main__":
    main()
