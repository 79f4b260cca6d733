"""The suite passes whatever the caller's environment holds: a cluster shell's W&B, Hugging Face, Hydra, thread,
GPU and launcher variables change nothing (tests/conftest.py clears and pins them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PINNED
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

# What a cluster login or a W&B user commonly exports, each one of which once changed a test's outcome or could.
HOSTILE = {
    "WANDB_MODE": "offline", "WANDB_PROJECT": "someone-elses", "WANDB_DIR": "/nonexistent/wandb", "WANDB_SILENT": "false",
    "HF_HOME": "/nonexistent/hf", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_VERBOSITY": "debug", "TRANSFORMERS_OFFLINE": "0",
    "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "7", "CUDA_VISIBLE_DEVICES": "0",
    "RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_RESTART_COUNT": "1",
}
# A W&B line printed first broke this one (WANDB_MODE=offline); a full Hydra traceback would break the one-line check;
# a rank or a SLURM requeue in the environment would change what train.py does with its directory.
TESTS = [
    "tests/test_bench_gpu.py::test_quick_prints_every_side_and_the_ratios[False]",
    "tests/test_errors.py::test_cli_exits_non_zero_with_one_line",
    "tests/test_rundir.py::test_a_second_holder_is_refused_with_the_first_ones_pid",
]


def test_the_suite_passes_under_a_hostile_environment(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if k != PINNED}, **HOSTILE}  # a shell that is not a test's child
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *TESTS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{len(TESTS)} passed" in proc.stdout
