"""Fine-tune on a task mixture with an isolation strategy: `python train.py [overrides]`, `-m` for sweeps.

The run itself is `epi.run.train(cfg, run_dir)`; this wrapper adds Hydra's run directory, the run's names, its
thread count and Hydra's record of it, and turns a failed job of a sweep into a recorded failure."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from epi import rundir
from epi.cli import exit_on_user_error
from epi.distributed import export_launcher_env
from epi.errors import RunDirTaken, UserError
from epi.evaluate import average
from epi.run import auto_threads, train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    task_config = copy.deepcopy(cfg)  # as composed: what Hydra would have written to .hydra/config.yaml
    export_launcher_env()  # SLURM/submitit tasks: RANK, LOCAL_WORLD_SIZE, ... as torchrun sets them, read below
    if cfg.threads is None:
        cfg.threads = auto_threads(hc)  # recorded in config.yaml
    overrides = [o for o in hc.overrides.task if not o.startswith("resume=")]
    cfg.logger.name = cfg.logger.name or rundir.run_name(overrides)
    cfg.logger.group = cfg.logger.group or rundir.setting_name(overrides)
    run_dir = Path(hc.runtime.output_dir)

    def hydra_record(directory: Path) -> None:  # .hydra/ as Hydra writes it, once the run may use `directory`
        rundir.write_hydra_record(directory, task_config, hc, hc.overrides.task)

    try:
        results = train(cfg, run_dir, hydra_record)
    except Exception as e:
        if hc.mode != RunMode.MULTIRUN:
            raise  # one run: one line on stderr (a UserError) or the traceback of a bug, and its exit code
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        if rundir.rank_zero() and not isinstance(e, RunDirTaken):  # what eval.py runs= lists for a job that did not finish; a
            # job refused because its directory holds another run leaves that run's files as they are
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / rundir.ERROR).write_text(f"error: {message}\n")
            if not (run_dir / rundir.HYDRA_RECORD).exists():  # a job refused before it held its (new) directory:
                # its overrides name it in eval.py's list; an existing run's record is never replaced
                hydra_record(run_dir)
        if not isinstance(e, UserError):
            raise
        recorded = "its directory was left as it was" if isinstance(e, RunDirTaken) else f"recorded as failed in {run_dir / rundir.ERROR}"
        print(f"error: {message} (job {hc.job.num} {recorded}; the sweep goes on)", file=sys.stderr)
        return None
    return average(results).get("score")  # the sweeper's objective; None when every task is scored by perplexity


if __name__ == "__main__":
    main()
