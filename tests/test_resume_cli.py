"""Resume from the command line after SIGKILL, as a preempted job would: bit-identical to a straight run.

The process is killed twice, each time while `checkpoint.pt.tmp` is half-way into place (the
kill comes between writing it and renaming it; tests/killer/sitecustomize.py), and resumed
with `train.py resume=<run dir> hydra.run.dir=<run dir> <same overrides>`.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epi import checkpoint
from epi.logging import read_metrics
from tests.helpers import ROOT, TINY, run_main, run_script

pytestmark = pytest.mark.slow

STRATEGIES = {
    "epi": ["strategy=epi", "strategy.warmup=2", "strategy.refresh_every=3"],
    "cpi": ["strategy=cpi", "strategy.probe_steps=2"],  # 5 stages of 2 steps: kills land on stage ends
}


WALL_CLOCK = ("tokens_per_s", "refresh_seconds")  # what differs between any two runs


def killed_at_save(n: int, hash_seed: int) -> dict[str, str]:
    return {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'killer'}", "EPI_KILL_AT_SAVE": str(n), "PYTHONHASHSEED": str(hash_seed)}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sigkill_mid_checkpoint_then_cli_resume_is_bit_identical(strategy: str, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    args = [*TINY, *STRATEGIES[strategy], "schedule.steps=10", "schedule.checkpoint_every=2"]
    cache = {d: [f"strategy.cache_dir={tmp_path / d / 'cache'}"] if strategy == "cpi" else [] for d in ("straight", "run")}  # EPI has none
    # (each run its own CPI probe cache: the killed run's first attempt probes as the straight run did, and its resumes
    # read the probes back from that cache)
    # Each process gets another string-hash seed: nothing may depend on set order (CPI's core ties once did). The killed
    # attempts are processes of their own; the straight run and the last resume run train.py's main in this process
    # (run_main: the same command line, under the test worker's own hash seed).
    straight = run_main("train.py", *args, *cache["straight"], f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path, capfd=capfd)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "run"
    first = run_script("train.py", *args, *cache["run"], f"hydra.run.dir={run}", cwd=tmp_path, env=killed_at_save(2, hash_seed=2))
    assert first.returncode == -signal.SIGKILL
    assert (run / "checkpoint.pt.tmp").is_file() and checkpoint.load(str(run))["step"] == 2

    resume = [*args, *cache["run"], f"resume={run}", f"hydra.run.dir={run}"]
    second = run_script("train.py", *resume, cwd=tmp_path, env=killed_at_save(2, hash_seed=3))  # saves at 4, killed saving 6
    assert second.returncode == -signal.SIGKILL
    assert (run / "checkpoint.pt.tmp").is_file() and checkpoint.load(str(run))["step"] == 4

    last = run_main("train.py", *resume, cwd=tmp_path, capfd=capfd)
    assert last.returncode == 0, last.stderr[-3000:]
    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "straight", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def events(d: Path) -> list[tuple]:
        return [(e["step"], e["split"], e["task"], e["metric"], e["value"]) for e in read_metrics(d)
                if e["metric"] not in WALL_CLOCK]

    # Event for event: every step logged once, the same numbers, and nothing a resumed run rebuilds at start-up (the
    # step-0 data statistics, CPI's probes) logged again.
    straight_events, run_events = events(tmp_path / "straight"), events(run)
    assert run_events == straight_events, next(((i, a, b) for i, (a, b) in enumerate(zip(run_events, straight_events)) if a != b), len(run_events) - len(straight_events))
