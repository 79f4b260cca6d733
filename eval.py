"""Evaluate models, or tabulate sets of runs.

    python eval.py run_dir=<dir>          # a train.py run's model on the run's task mixture
    python eval.py model_dir=<HF dir>     # any Hugging Face model on the `data` mixture
    python eval.py runs=<dir or [dirs]>   # tables and plots over finished runs (a multirun dir, say, or its .tar.xz archive)
    python eval.py runs=<dir> archive=<new dir or .tar.xz>   # ... and a copy of the runs' evidence, small enough to commit

The two jobs live in epi.report.jobs (`evaluate_model`, `report_runs`), callable in-process.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from epi.cli import exit_on_user_error
from epi.report.jobs import job_of


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    job_of(cfg)(cfg, out_dir)
    print(f"written to {out_dir}")


if __name__ == "__main__":
    main()
