"""Issue 14: predictions a reviewer can read, sweeps that share the cores, names that stay short, compute counted."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from epi.logging import read_metrics, short_name
from epi.trainer import Trainer
from tests.conftest import TINY, make_cfg, run_script

TASKS = ("math", "code", "logic", "instruct", "format")


def test_predictions_file_lets_a_reviewer_audit_every_score(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, "strategy=none", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * len(TASKS)  # eval.n_examples per task
    assert set(lines[0]) == {"task", "prompt", "reference", "prediction", "score", "loss"}
    final = json.loads((run / "eval_test.json").read_text())
    for task in TASKS:
        mine = [r for r in lines if r["task"] == task]
        assert sum(r["score"] for r in mine) / len(mine) == final[task]["score"]  # the table's number, example by example
        assert all(r["score"] == float(r["prediction"].strip() == r["reference"].strip()) for r in mine)

    # eval.py on the run's model/ (not run_dir=) scores the run's own tasks and writes its predictions too
    out = tmp_path / "ev"
    proc = run_script("eval.py", f"model_dir={run / 'model'}", "eval.n_examples=4", "eval.max_new_tokens=8", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is a run's model: evaluating on that run's data config" in proc.stdout
    assert json.loads((out / "eval_test.json").read_text()) == final
    assert (out / "predictions_test.jsonl").read_text() == (run / "predictions_test.jsonl").read_text()


def test_eval_of_a_single_task_run_model_scores_that_task_not_the_defaults(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, "strategy=none", "data.tasks=[logic]", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script("eval.py", f"model_dir={run / 'model'}", "eval.n_examples=4", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(json.loads((tmp_path / "ev" / "eval_test.json").read_text())) == ["logic"]


def test_a_sweep_divides_the_cores_among_its_parallel_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", *TINY, "strategy=none", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [OmegaConf.load(sweep / job / "config.yaml").threads for job in ("0", "1")] == [expected, expected]
    proc = run_script("train.py", *TINY, "strategy=none", "threads=1", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert OmegaConf.load(tmp_path / "one" / "config.yaml").threads == 1


def test_a_sweep_across_strategies_takes_strategy_specific_keys(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", *TINY, "strategy=none,cpi", "++strategy.probe_steps=1", f"++strategy.cache_dir={tmp_path / 'cache'}",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy=none ignores strategy.cache_dir, strategy.probe_steps (keys of other strategies)" in proc.stdout
    assert OmegaConf.load(sweep / "1" / "config.yaml").strategy.probe_steps == 1
    assert all((sweep / job / "eval_test.json").is_file() for job in ("0", "1"))
    typo = run_script("train.py", *TINY, "strategy=none", "++strategy.probe_stepz=1", f"hydra.run.dir={tmp_path / 'typo'}", cwd=tmp_path)
    assert typo.returncode == 2 and "strategy=none: unknown key(s) ['probe_stepz']" in typo.stderr


def test_names_stay_short_while_the_config_keeps_every_override(tmp_path: Path) -> None:
    assert short_name("strategy=epi,seed=1") == "strategy=epi,seed=1"
    long = ",".join(f"data.sources.task{i}.train=/some/long/path/to/task{i}/train.jsonl" for i in range(5))
    short = short_name(long)
    assert len(short) == 64 and short != short_name(long + "x") and short.startswith(long[:40])
    run = tmp_path / "run"
    overrides = ["strategy=none", "optimizer.lr=0.00123", "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.25", "eval.max_new_tokens=7"]
    proc = run_script("train.py", *TINY, *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = OmegaConf.load(run / "config.yaml").logger.name
    assert "eval.max_new_tokens=7" in name and len(name) > 64
    assert f"{short_name(name)} (test split" in proc.stdout


def cpi(tmp_path: Path, name: str, *extra: str) -> Trainer:
    (tmp_path / name).mkdir()
    trainer = Trainer(make_cfg("strategy=cpi", "strategy.probe_steps=2", "schedule.steps=20", f"strategy.cache_dir={tmp_path / 'cache'}", *extra), tmp_path / name)
    trainer.fit()
    return trainer


def compute(run: Path) -> dict[str, float]:
    return {e["metric"]: e["value"] for e in read_metrics(run) if e["split"] == "compute"}


def test_compute_counts_the_probes_even_from_the_cache_and_can_charge_them_to_the_budget(tmp_path: Path) -> None:
    first = cpi(tmp_path, "first")
    stages = sum(stage.steps for stage in first.stages)
    assert compute(tmp_path / "first")["optimizer_steps"] == stages + 2 * len(TASKS)
    cpi(tmp_path, "again")  # every probe from the cache: the same compute, charged all the same
    assert compute(tmp_path / "again") == compute(tmp_path / "first")
    assert [e["value"] for e in read_metrics(tmp_path / "again") if e["metric"] == "probe_cache_hit"] == [1.0] * len(TASKS)
    equal = cpi(tmp_path, "equal", "strategy.count_probes_in_budget=true")
    assert compute(tmp_path / "equal")["optimizer_steps"] <= 20 and sum(s.steps for s in equal.stages) <= 20 - 2 * len(TASKS)


def test_a_failing_job_is_recorded_the_sweep_goes_on_and_the_report_lists_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", *TINY, "strategy=none", "optimizer.lr=-1,1e-3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error: optimizer.lr=-1.0: must be > 0" in proc.stderr or "error: optimizer.lr=-1: must be > 0" in proc.stderr
    assert (sweep / "0" / "error.txt").read_text().startswith("error: optimizer.lr=-1")
    assert (sweep / "1" / "eval_test.json").is_file()  # the job after the failure ran
    out = tmp_path / "report"
    proc = run_script("eval.py", f"runs={sweep}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "Runs that did not finish" in report and "error: optimizer.lr=-1" in report


def test_the_final_evaluation_reuses_the_last_stage_evaluation(tmp_path: Path, monkeypatch) -> None:
    import epi.trainer

    calls = []
    real = epi.trainer.evaluate
    monkeypatch.setattr(epi.trainer, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    stages = "schedule.stages=[{name: a, tasks: [math], steps: 3}, {name: b, tasks: [code], steps: 3}]"
    trainer = Trainer(make_cfg("strategy=none", stages), tmp_path)
    final = trainer.fit()
    assert len(calls) == 2  # after stage a, after stage b; the final table is stage b's (same weights, same step)
    events = read_metrics(tmp_path)
    after_b = {e["task"]: e["value"] for e in events if e["split"] == "test/after_stage1" and e["metric"] == "score"}
    assert after_b == {t: r["score"] for t, r in final.items()} and len(trainer.predictions) == 4 * len(TASKS)
    assert {e["task"] for e in events if e["split"] == "test" and e["metric"] == "score"} == set(TASKS)
