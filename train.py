"""Fine-tune on a task mixture with an isolation strategy: `python train.py [overrides]`, `-m` for sweeps."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from epi import checkpoint
from epi.cli import exit_on_user_error, run_name, write_results
from epi.config import validate
from epi.data.load import known_tasks
from epi.errors import UserError
from epi.evaluate import average
from epi.trainer import Trainer

# Sections of the config a resumed run must share with its checkpoint.
RESUME_MUST_MATCH = ("model", "data", "strategy", "schedule", "seed")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    validate(cfg, known_tasks(cfg.data))
    resume_state = checkpoint.load(cfg.resume) if cfg.resume else None
    if resume_state is not None:
        saved = resume_state["config"]
        changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != OmegaConf.to_container(cfg[k], resolve=True)]
        if changed:
            raise UserError(f"resume={cfg.resume!r}: the checkpoint was trained with different {changed}; resume with the same settings.")

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = [o for o in hc.overrides.task if not o.startswith("resume=")]
    cfg.logger.name = cfg.logger.name or run_name(overrides)
    cfg.logger.group = cfg.logger.group or run_name(overrides, drop=("seed",))
    trainer = Trainer(cfg, run_dir, resume_state)
    writer = trainer.rank == 0  # under torchrun, rank 0 writes the run's files
    if writer:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results = trainer.fit()
    if writer:
        scorers = {name: task.scorer for name, task in trainer.tasks.items()}
        print(write_results(run_dir, cfg.eval.split, results, scorers, f"{cfg.logger.name} ({cfg.eval.split} split, {run_dir})"))
    return average(results).get("score")  # the sweeper's objective; None when every task is scored by perplexity


if __name__ == "__main__":
    main()
