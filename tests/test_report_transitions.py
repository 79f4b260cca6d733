"""The forgetting report's per-example transitions: right -> wrong (forgotten) and wrong -> right (learned) between
the end of a task's own stage and the end of the run, counted per arm and paired against the baseline.

Hand-made prediction files with known transitions, so every count below is checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epi import rundir
from epi.report import write_report
from epi.report.runs import load_runs
from epi.report.transitions import run_transitions
from tests.helpers import make_cfg
from tests.test_report import fake_run

N = 20  # test examples per task


def write(run: Path, name: str, per_task: dict[str, list[float]]) -> None:
    records = [{"task": t, "prompt": f"{t} question {i}", "reference": f"{t} answer {i}", "prediction": "x", "score": s, "loss": 1.0}
               for t, scores in per_task.items() for i, s in enumerate(scores)]
    (run / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def sequential(root: Path, group: str, seed: int, a_after_a: list[float], a_at_end: list[float]) -> Path:
    """A finished A-then-B run: task a's scores after stage 0 and at the end (b is trained last: no transition)."""
    b = [1.0] * N
    run = fake_run(root, f"{group}-{seed}".replace("+", ""), group=group, seed=seed, tasks=["a", "b"],
                   scores={"a": sum(a_at_end) / N, "b": 1.0}, stages=[["a"], ["b"]],
                   matrix=[{"a": sum(a_after_a) / N, "b": 0.0}, {"a": sum(a_at_end) / N, "b": 1.0}])
    write(run, rundir.predictions("test", after_stage=0), {"a": a_after_a, "b": [0.0] * N})
    write(run, rundir.predictions("test", after_stage=1), {"a": a_at_end, "b": b})
    write(run, rundir.predictions("test"), {"a": a_at_end, "b": b})
    return run


def right(*indices: int) -> list[float]:
    return [1.0 if i in indices else 0.0 for i in range(N)]


def test_counts_the_transitions_of_the_earlier_stages_tasks_only(tmp_path: Path) -> None:
    # after A: examples 0-9 right; at the end: 0-5 and 12-13 right -> forgotten 6,7,8,9 (4), learned 12,13 (2)
    run = sequential(tmp_path, "arm=none", 0, right(*range(10)), right(*range(6), 12, 13))
    (loaded,), _ = load_runs([tmp_path], "test")
    found = run_transitions(loaded, "test")
    assert found.examples == N  # task a only: b was trained in the last stage
    assert sum(found.forgotten.values()) == 4 and sum(found.learned.values()) == 2 and found.right_before == 10
    assert {k[1] for k, v in found.forgotten.items() if v} == {f"a question {i}" for i in (6, 7, 8, 9)}
    # the average moved by 0.1 (10 -> 8 right); the counts see the churn under it: 4 forgotten, 2 learned
    (run / rundir.predictions("test", after_stage=0)).unlink()
    assert "no predictions_test_after_stage0.jsonl" in run_transitions(loaded, "test")


def test_the_report_shows_counts_shares_and_the_paired_difference(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed in (0, 1):
        # the baseline forgets 8 of its 10 right answers; the arm forgets 1, and both learn 1
        sequential(root, "arm=none", seed, right(*range(10)), right(0, 1, 15))
        sequential(root, "arm=iso", seed, right(*range(10)), right(*range(1, 10), 15))
    out = tmp_path / "out"
    report = write_report(root, out)
    md = (out / "report.md").read_text()
    assert "## Sequential training: per-example forgetting" in md
    assert "| arm=none | 2 | 20.000 ± 0.000 | 10.000 ± 0.000 | 8.000 ± 0.000 | 0.400 ± 0.000 | 1.000 ± 0.000 | 0.050 ± 0.000 |" in md
    assert "| arm=iso | 2 | 20.000 ± 0.000 | 10.000 ± 0.000 | 1.000 ± 0.000 | 0.050 ± 0.000 | 1.000 ± 0.000 | 0.050 ± 0.000 |" in md
    (paired,) = report.data["per_example_forgetting"]["vs_baseline"]
    assert paired["setting"] == "arm=iso" and paired["baseline"] == "arm=none" and paired["seeds"] == [0, 1]
    assert paired["forgotten"]["diff"] == pytest.approx(-0.35) and paired["forgotten"]["ci_high"] < 0  # resolved: fewer forgotten
    assert paired["learned"]["diff"] == pytest.approx(0.0)
    assert "| arm=iso | arm=none | 2 | 20 | -0.350 [" in md
    assert (out / "transitions.csv").read_text().startswith("setting,seeds,examples_mean")


def test_runs_without_per_stage_predictions_are_said_not_counted(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = sequential(root, "arm=none", 0, right(0), right(0))
    (run / rundir.predictions("test", after_stage=0)).unlink()  # a run from before they were kept
    write_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Left out: arm=none (seeds 0): no predictions_test_after_stage0.jsonl (a run from before" in md


def test_a_sequential_run_writes_its_predictions_after_every_stage(tmp_path: Path) -> None:
    from epi.trainer import Trainer

    cfg = make_cfg("schedule.stages=[{name: A, tasks: [math], steps: 2}, {name: B, tasks: [code], steps: 2}]",
                   "data.tasks=[math,code]", "schedule.steps=4", "schedule.eval_every=0")
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    for k in (0, 1):
        lines = (tmp_path / rundir.predictions("test", after_stage=k)).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert {r["task"] for r in records} == {"math", "code"} and all("score" in r for r in records)
    # the last stage's predictions are the final evaluation's (same weights, evaluated once)
    assert [json.loads(x) for x in (tmp_path / rundir.predictions("test", after_stage=1)).read_text().splitlines()] == trainer.predictions
