"""Sweeps (`train.py -m`): parallel jobs share the cores, strategy-specific keys go to the strategies that take them,
a failing job is recorded while the sweep goes on, and run names stay short while the config keeps every override.
The joblib sweep runs as a process of its own; the basic launcher's sweeps run train.py's main in this process
(run_main: the same composition, jobs and output)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from epi.logging import short_name
from tests.helpers import TINY, run_main, run_script

pytestmark = pytest.mark.slow


def test_a_sweep_divides_the_cores_among_its_parallel_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", *TINY, "strategy=none", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [OmegaConf.load(sweep / job / "config.yaml").threads for job in ("0", "1")] == [expected, expected]
    # (a single run keeps the threads it is given: the run of test_names_stay_short_while_the_config_keeps_every_override)


def test_a_sweep_across_strategies_takes_strategy_specific_keys(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    proc = run_main("train.py", "-m", *TINY, "strategy=none,cpi", "++strategy.probe_steps=1", f"++strategy.cache_dir={tmp_path / 'cache'}",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy=none ignores strategy.cache_dir, strategy.probe_steps (keys of other strategies)" in proc.stdout
    assert OmegaConf.load(sweep / "1" / "config.yaml").strategy.probe_steps == 1
    assert all((sweep / job / "eval_test.json").is_file() for job in ("0", "1"))
    typo = run_main("train.py", *TINY, "strategy=none", "++strategy.probe_stepz=1", f"hydra.run.dir={tmp_path / 'typo'}", cwd=tmp_path, capfd=capfd)
    assert typo.returncode == 2 and "strategy=none: unknown key(s) ['probe_stepz']" in typo.stderr


def test_a_failing_job_is_recorded_the_sweep_goes_on_and_the_report_lists_it(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    proc = run_main("train.py", "-m", *TINY, "strategy=none", "optimizer.lr=-1,1e-3", f"hydra.sweep.dir={sweep}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error: optimizer.lr=-1.0: must be > 0" in proc.stderr or "error: optimizer.lr=-1: must be > 0" in proc.stderr
    assert (sweep / "0" / "error.txt").read_text().startswith("error: optimizer.lr=-1")
    assert (sweep / "1" / "eval_test.json").is_file()  # the job after the failure ran
    out = tmp_path / "report"
    proc = run_main("eval.py", f"runs={sweep}", f"hydra.run.dir={out}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "Runs that did not finish" in report and "error: optimizer.lr=-1" in report


def test_names_stay_short_while_the_config_keeps_every_override(tmp_path: Path) -> None:
    assert short_name("strategy=epi,seed=1") == "strategy=epi,seed=1"
    long = ",".join(f"data.sources.task{i}.train=/some/long/path/to/task{i}/train.jsonl" for i in range(5))
    short = short_name(long)
    assert len(short) == 64 and short != short_name(long + "x") and short.startswith(long[:40])
    run = tmp_path / "run"
    overrides = ["strategy=none", "optimizer.lr=0.00123", "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.25", "eval.max_new_tokens=7",
                 "threads=1"]
    proc = run_script("train.py", *TINY, *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert OmegaConf.load(run / "config.yaml").threads == 1  # a single run keeps the threads it is given (no sweep to divide)
    name = OmegaConf.load(run / "config.yaml").logger.name
    assert "eval.max_new_tokens=7" in name and len(name) > 64
    assert f"{short_name(name)} (test split" in proc.stdout
