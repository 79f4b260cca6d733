"""Evaluate a model on every task of a mixture: `python eval.py run_dir=<dir>` or `model_dir=<HF dir>`."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from epi.cli import exit_on_user_error, write_results
from epi.data.load import load_tasks
from epi.errors import UserError
from epi.evaluate import evaluate
from epi.models import build_model
from epi.plots import plot_drift
from epi.trainer import pick_device


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    if (cfg.run_dir is None) == (cfg.model_dir is None):
        raise UserError("give exactly one of run_dir=<train.py run directory> or model_dir=<Hugging Face model directory>")
    data, model_dir = cfg.data, cfg.model_dir
    if cfg.run_dir is not None:
        run_cfg = Path(cfg.run_dir) / "config.yaml"
        if not (Path(cfg.run_dir) / "model").is_dir() or not run_cfg.is_file():
            raise UserError(f"run_dir={cfg.run_dir!r} has no model/ and config.yaml; is it a finished train.py run directory?")
        data, model_dir = OmegaConf.load(run_cfg).data, str(Path(cfg.run_dir) / "model")
    model_cfg = OmegaConf.create(
        {"kind": "hf", "name_or_path": model_dir, "gguf_file": None, "dtype": "float32", "attn_implementation": "sdpa", "gradient_checkpointing": False}
    )
    model, tok = build_model(model_cfg)
    model.to(pick_device(cfg.device))
    e = cfg.eval
    results = evaluate(
        model, tok, load_tasks(data), split=e.split, n_examples=e.n_examples,
        batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, max_len=data.max_len,
    )
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    print(write_results(out_dir, e.split, results, f"{model_dir} ({e.split} split)"))
    if cfg.run_dir is not None and plot_drift({Path(cfg.run_dir).name: Path(cfg.run_dir)}, out_dir / "drift.png"):
        print(f"mask drift plot: {out_dir / 'drift.png'}")
    print(f"written to {out_dir}")


if __name__ == "__main__":
    main()
