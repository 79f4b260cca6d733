"""Predictions a reviewer can read: every score example by example in predictions_test.jsonl, eval.py on a run's
model scores that run's tasks, and the final table reuses the last stage's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epi.logging import read_metrics
from epi.trainer import Trainer
from tests.helpers import TINY, make_cfg, run_script


TASKS = ("math", "code", "logic", "instruct", "format")


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")
def test_predictions_file_lets_a_reviewer_audit_every_score(tmp_path: Path, finished_run) -> None:
    run, _ = finished_run
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


@pytest.mark.slow
def test_eval_of_a_single_task_run_model_scores_that_task_not_the_defaults(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, "strategy=none", "data.tasks=[logic]", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script("eval.py", f"model_dir={run / 'model'}", "eval.n_examples=4", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(json.loads((tmp_path / "ev" / "eval_test.json").read_text())) == ["logic"]


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
