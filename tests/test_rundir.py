"""One run per directory: the lock, and a refused run that leaves the directory's run exactly as it was."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epi import rundir
from epi.errors import RunDirTaken
from epi.logging import read_metrics
from tests.helpers import ROOT, TINY, run_main


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, hidden ones (.hydra/) included."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    with rundir.hold(tmp_path / "run") as lock:
        lock.claim()
        with pytest.raises(RunDirTaken, match=rf"in use by another run \(pid {os.getpid()} on "):
            with rundir.hold(tmp_path / "run"):
                pass
    with rundir.hold(tmp_path / "run"):  # released with the block
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from epi import rundir\n"
         "with rundir.hold(sys.argv[1]) as lock:\n    lock.claim(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirTaken, match=f"pid {holder.pid} "):
        with rundir.hold(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with rundir.hold(tmp_path):  # what a SLURM requeue of the killed job does
        pass


@pytest.mark.slow
def test_train_py_refuses_a_directory_another_run_holds(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    with rundir.hold(tmp_path / "run") as lock:  # an flock: a second open file is refused, in this process as in another
        lock.claim()
        proc = run_main("train.py", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'run'} is in use by another run (pid {os.getpid()} ")
    assert {p.name for p in (tmp_path / "run").iterdir()} <= {rundir.LOCK, "train.log"}  # no .hydra/, no metrics (Hydra's empty job log)


@pytest.mark.slow
def test_two_runs_started_at_once_into_one_directory_leave_one_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), *TINY, "strategy=none", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    refused = outs[[p.returncode for p in procs].index(2)][1].strip().splitlines()[-1]
    # the holder's pid, or "a process that is just starting" when the refusal comes between the other's lock and its claim
    assert refused.startswith("error: ") and ("is in use by another run (" in refused or "already holds a run" in refused)
    losses = [e for e in read_metrics(run) if e["split"] == "train" and e["metric"] == "loss"]
    assert [e["step"] for e in losses] == [1, 2, 3, 4, 5, 6]  # one run's events, not two interleaved


@pytest.mark.slow
def test_a_refused_run_changes_nothing_of_the_finished_run_there(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    # In-process (run_main): the same composition, run directory and exit codes as `python train.py`, without five
    # interpreters' start-up; test_two_runs_started_at_once_into_one_directory_leave_one_run crosses the process boundary.
    sweep = tmp_path / "sweep"
    common = ["-m", *TINY, "strategy=none", f"hydra.sweep.dir={sweep}", "hydra/launcher=basic"]
    first = run_main("train.py", *common, "seed=0", cwd=tmp_path, capfd=capfd)
    assert first.returncode == 0, first.stderr[-3000:]
    job = sweep / "0"
    before = digest(job)
    assert ".hydra/overrides.yaml" in before and rundir.LOCK in before
    time.sleep(0.01)
    attempts = [
        run_main("train.py", *TINY, "strategy=none", "seed=1", f"hydra.run.dir={job}", cwd=tmp_path, capfd=capfd),  # a new run there
        run_main("train.py", *TINY, "strategy=none", "seed=1", "resume=auto", f"hydra.run.dir={job}", cwd=tmp_path, capfd=capfd),  # not its own run
        run_main("train.py", *common, "seed=1", cwd=tmp_path, capfd=capfd),  # the sweep again, another seed: job 0 refused
        run_main("train.py", *TINY, "strategy=none", f"resume={job}", f"hydra.run.dir={job}", cwd=tmp_path, capfd=capfd),  # finished: nothing to resume
    ]
    for proc in attempts[:2] + attempts[3:]:
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr[-2000:]
    assert "its directory was left as it was" in attempts[2].stderr
    assert digest(job) == before


@pytest.mark.slow
def test_a_directory_holding_a_run_is_refused_and_left_as_it_was(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_main("train.py", *TINY, "strategy=none", f"hydra.run.dir={run}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2
    assert "already holds a run (metrics.jsonl)" in proc.stderr.strip().splitlines()[-1]
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n' and not (run / "config.yaml").exists()
