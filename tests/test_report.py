"""eval.py runs=...: known numbers in fabricated run directories, known tables out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from epi import report
from tests.conftest import run_script


def fake_run(root: Path, name: str, *, group: str, seed: int, tasks: list[str], scores: dict[str, float],
             stages: list[list[str]] | None = None, matrix: list[dict[str, float]] | None = None, curve: list[float] = ()) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "seed": seed,
        "logger": {"group": group},
        "data": {"tasks": tasks},
        "schedule": {"stages": [{"name": f"s{i}", "tasks": s, "steps": 10} for i, s in enumerate(stages)] if stages else None},
    }
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (run / "eval_test.json").write_text(json.dumps({t: {"score": s, "loss": 1.0} for t, s in scores.items()}))
    events = [{"step": 10 * (i + 1), "split": "test", "task": None, "metric": "avg_score", "value": v} for i, v in enumerate(curve)]
    for k, row in enumerate(matrix or []):
        events += [{"step": 10 * (k + 1), "split": f"test/after_stage{k}", "task": t, "metric": "score", "value": v} for t, v in row.items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    fake_run(root, "0", group="strategy=none", seed=0, tasks=["a", "b"], scores={"a": 0.4, "b": 0.2}, curve=[0.1, 0.3])
    fake_run(root, "1", group="strategy=none", seed=1, tasks=["a", "b"], scores={"a": 0.6, "b": 0.4}, curve=[0.2, 0.5])
    fake_run(root, "2", group="data.tasks=[a]", seed=0, tasks=["a"], scores={"a": 0.8})
    fake_run(root, "3", group="data.tasks=[b]", seed=0, tasks=["b"], scores={"b": 0.6})
    fake_run(root, "4", group="seq", seed=0, tasks=["a", "b"], scores={"a": 0.3, "b": 0.9}, stages=[["a"], ["b"]],
             matrix=[{"a": 0.7, "b": 0.1}, {"a": 0.3, "b": 0.9}])
    return root


def test_score_table_normalised_score_and_transfer(runs: Path) -> None:
    loaded = [report.load_run(p, "test") for p in report.find_runs([runs])]
    tasks, rows = report.score_table(loaded)
    assert tasks == ["a", "b"]
    none = next(r for r in rows if r["setting"] == "strategy=none")
    assert none["seeds"] == 2
    assert none["a"] == pytest.approx((0.5, 0.1414213), abs=1e-6)
    assert none["avg"][0] == pytest.approx(0.4)  # mean of the per-seed averages 0.3 and 0.5
    # normalised: (0.5 / 0.8 + 0.3 / 0.6) / 2
    assert none["normalised"] == pytest.approx((0.5 / 0.8 + 0.3 / 0.6) / 2)
    seq = next(r for r in loaded if r.setting == "seq")
    t = report.transfer(seq)
    assert t == pytest.approx({"bwt": 0.3 - 0.7, "forgetting": 0.7 - 0.3, "delta_A": 0.3 - 0.7, "delta_B": 0.9 - 0.1})
    assert report.transfer(loaded[0]) is None


def test_eval_py_runs_writes_tables_and_plots(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_script("eval.py", f"runs={runs}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    assert "| strategy=none | 2 | 0.500 ± 0.141 | 0.300 ± 0.141 | 0.400 ± 0.141 | 0.562 |" in md
    assert "| seq | 1 | -0.400 ± 0.000 | 0.800 ± 0.000 | -0.400 ± 0.000 | 0.400 ± 0.000 |" in md
    csv = (out / "scores.csv").read_text().splitlines()
    assert csv[0] == "setting,seeds,a_mean,a_std,b_mean,b_std,avg_mean,avg_std,normalised"
    assert (out / "scores_over_steps.png").is_file()
    data = json.loads((out / "report.json").read_text())
    assert {r["setting"] for r in data["scores"]} == {"strategy=none", "data.tasks=[a]", "data.tasks=[b]", "seq"}


def test_eval_py_runs_with_no_runs_fails_clearly(tmp_path: Path) -> None:
    proc = run_script("eval.py", f"runs={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 2 and "no run directories" in proc.stderr


def test_core_overlap_is_averaged_over_seeds_and_drawn(runs: Path, tmp_path: Path) -> None:
    for seed, off in ((0, 0.2), (1, 0.4)):
        run = fake_run(runs, f"cpi{seed}", group="strategy=cpi", seed=seed, tasks=["a", "b"], scores={"a": 0.5, "b": 0.5})
        (run / "cpi").mkdir()
        (run / "cpi" / "overlap.json").write_text(json.dumps({"tasks": ["a", "b"], "jaccard": [[1.0, off], [off, 1.0]]}))
    loaded = [report.load_run(p, "test") for p in report.find_runs([runs])]
    groups = report.by_setting(loaded)
    assert report.core_overlap(groups["strategy=cpi"]) == (["a", "b"], [[1.0, pytest.approx(0.3)], [pytest.approx(0.3), 1.0]])
    assert report.core_overlap(groups["strategy=none"]) is None
    out = tmp_path / "out"
    proc = run_script("eval.py", f"runs={runs}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "overlap_strategy=cpi.png").is_file()


def test_runs_listed_in_sweep_order(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        fake_run(tmp_path, str(n), group=f"g{n}", seed=0, tasks=["a"], scores={"a": 0.5})
    assert [p.name for p in report.find_runs([tmp_path])] == ["1", "2", "10"]  # not "1", "10", "2"


def test_a_missing_stage_evaluation_is_marked_not_closed_up(tmp_path: Path) -> None:
    """Stage 1's evaluation is lost: row 1 stays a gap, the run is left out of BWT and named in the report."""
    run = fake_run(tmp_path / "runs", "0", group="seq", seed=0, tasks=["a", "b", "c"], scores={"a": 0.1, "b": 0.2, "c": 0.9},
                   stages=[["a"], ["b"], ["c"]], matrix=[{"a": 0.9, "b": 0.0, "c": 0.0}, {"a": 0.5, "b": 0.8, "c": 0.0}, {"a": 0.1, "b": 0.2, "c": 0.9}])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events if e["split"] != "test/after_stage1"))
    loaded = report.load_run(run, "test")
    assert loaded.matrix[1] is None and loaded.matrix[2] == {"a": 0.1, "b": 0.2, "c": 0.9}
    assert loaded.missing_stages == [1] and report.transfer(loaded) is None
    out = tmp_path / "out"
    proc = run_script("eval.py", f"runs={tmp_path / 'runs'}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    assert "Runs left out of the transfer numbers" in md and "stage(s) [1]" in md
    assert json.loads((out / "report.json").read_text())["runs"][0]["accuracy_matrix"][1] is None
