"""eval.py runs=...: known numbers in fabricated run directories, known tables out."""

from __future__ import annotations

import math

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from epi import plots, report
from epi.rundir import setting_name
from epi.errors import UserError
from tests.helpers import eval_report, run_main


def fake_run(root: Path, name: str, *, group: str, seed: int, tasks: list[str], scores: dict[str, float],
             stages: list[list[str]] | None = None, matrix: list[dict[str, float]] | None = None, curve: list[float] = (),
             task_curves: dict[str, list[float]] | None = None, compute: dict[str, float] | None = None) -> Path:
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
    for task, values in (task_curves or {}).items():
        events += [{"step": 10 * (i + 1), "split": "test", "task": task, "metric": "score", "value": v} for i, v in enumerate(values)]
    for k, row in enumerate(matrix or []):
        events += [{"step": 10 * (k + 1), "split": f"test/after_stage{k}", "task": t, "metric": "score", "value": v} for t, v in row.items()]
    # as train.py logs them once at the end: split `compute`, no task
    events += [{"step": 100, "split": "compute", "task": None, "metric": m, "value": v} for m, v in (compute or {}).items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def fake_job(root: Path, name: str, overrides: list[str], *, job: str = "train", files: dict[str, str] | None = None) -> Path:
    """What a Hydra job leaves before train.py writes anything: .hydra/ and an empty job log (seen in a real
    sweep whose second job failed validation), plus `files` (e.g. error.txt)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": {"job": {"name": job}}})))
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    (run / f"{job}.log").write_text("")
    for file, text in (files or {}).items():
        (run / file).write_text(text)
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
    assert (none["a"].mean, none["a"].std, none["a"].n) == pytest.approx((0.5, 0.1414213, 2), abs=1e-6)
    assert none["avg"].mean == pytest.approx(0.4)  # mean of the per-seed averages 0.3 and 0.5
    # normalised: (0.5 / 0.8 + 0.3 / 0.6) / 2
    assert none["normalised"] == pytest.approx((0.5 / 0.8 + 0.3 / 0.6) / 2)
    seq = next(r for r in loaded if r.setting == "seq")
    t = report.transfer(seq)
    assert {k: t[k] for k in ("bwt", "forgetting", "delta_A", "delta_B")} == pytest.approx(
        {"bwt": 0.3 - 0.7, "forgetting": 0.7 - 0.3, "delta_A": 0.3 - 0.7, "delta_B": 0.9 - 0.1})
    assert report.transfer(loaded[0]) is None


@pytest.mark.slow
def test_eval_py_runs_writes_tables_and_plots(runs: Path, tmp_path: Path) -> None:
    out, md = eval_report(runs, tmp_path)
    assert "| strategy=none | 2 | 0.500 ± 0.141 | 0.300 ± 0.141 | 0.400 ± 0.141 | 0.562 |" in md
    assert "| seq | 1 | -0.400 ± 0.000 | 0.800 ± 0.000 | -0.400 ± 0.000 | 0.400 ± 0.000 |" in md
    csv = (out / "scores.csv").read_text().splitlines()
    assert csv[0] == ("setting,seeds,a_mean,a_std,a_ci_low,a_ci_high,b_mean,b_std,b_ci_low,b_ci_high,"
                      "avg_mean,avg_std,avg_ci_low,avg_ci_high,normalised,steps,tokens")
    assert (out / "scores_over_steps.png").is_file()
    data = json.loads((out / "report.json").read_text())
    assert {r["setting"] for r in data["scores"]} == {"strategy=none", "data.tasks=[a]", "data.tasks=[b]", "seq"}


@pytest.mark.slow
def test_eval_py_runs_with_no_runs_fails_clearly(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    proc = run_main("eval.py", f"runs={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2 and "no run directories" in proc.stderr


@pytest.mark.slow
def test_core_overlap_is_averaged_over_seeds_and_drawn(capfd: pytest.CaptureFixture, runs: Path, tmp_path: Path) -> None:
    for seed, off in ((0, 0.2), (1, 0.4)):
        run = fake_run(runs, f"cpi{seed}", group="strategy=cpi", seed=seed, tasks=["a", "b"], scores={"a": 0.5, "b": 0.5})
        (run / "cpi").mkdir()
        (run / "cpi" / "overlap.json").write_text(json.dumps({"tasks": ["a", "b"], "jaccard": [[1.0, off], [off, 1.0]]}))
    loaded = [report.load_run(p, "test") for p in report.find_runs([runs])]
    groups = report.by_setting(loaded)
    assert report.core_overlap(groups["strategy=cpi"]) == (["a", "b"], [[1.0, pytest.approx(0.3)], [pytest.approx(0.3), 1.0]])
    assert report.core_overlap(groups["strategy=none"]) is None
    out = tmp_path / "out"
    proc = run_main("eval.py", f"runs={runs}", f"hydra.run.dir={out}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "overlap_strategy=cpi.png").is_file()


def test_runs_listed_in_sweep_order(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        fake_run(tmp_path, str(n), group=f"g{n}", seed=0, tasks=["a"], scores={"a": 0.5})
    assert [p.name for p in report.find_runs([tmp_path])] == ["1", "2", "10"]  # not "1", "10", "2"


@pytest.mark.slow
def test_a_missing_stage_evaluation_is_marked_not_closed_up(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Stage 1's evaluation is lost: row 1 stays a gap, the run is left out of BWT and named in the report."""
    run = fake_run(tmp_path / "runs", "0", group="seq", seed=0, tasks=["a", "b", "c"], scores={"a": 0.1, "b": 0.2, "c": 0.9},
                   stages=[["a"], ["b"], ["c"]], matrix=[{"a": 0.9, "b": 0.0, "c": 0.0}, {"a": 0.5, "b": 0.8, "c": 0.0}, {"a": 0.1, "b": 0.2, "c": 0.9}])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events if e["split"] != "test/after_stage1"))
    loaded = report.load_run(run, "test")
    assert loaded.matrix[1] is None and loaded.matrix[2] == {"a": 0.1, "b": 0.2, "c": 0.9}
    assert loaded.missing_stages == [1] and report.transfer(loaded) is None
    out = tmp_path / "out"
    proc = run_main("eval.py", f"runs={tmp_path / 'runs'}", f"hydra.run.dir={out}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    assert "Runs left out of the transfer numbers" in md and "stage(s) [1]" in md
    assert json.loads((out / "report.json").read_text())["runs"][0]["accuracy_matrix"][1] is None


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep as Hydra lays it out: experts interleaved with the arms, a job that failed with a recorded
    error, one that left none, one whose Hydra log has it, b's expert at 0, compute logged by the new runs."""
    root = tmp_path / "sweep"
    spent = {"optimizer_steps": 100, "trained_tokens": 1000}
    fake_run(root, "0", group="data.tasks=[a]", seed=0, tasks=["a"], scores={"a": 0.8}, task_curves={"a": [0.4, 0.8]}, curve=[0.4, 0.8])
    fake_run(root, "1", group="strategy=none", seed=0, tasks=["a", "b"], scores={"a": 0.4, "b": 0.2},
             task_curves={"a": [0.2, 0.4]}, curve=[0.1, 0.3], compute=spent)
    fake_job(root, "2", ["strategy=epi", "optimizer.lr=-1", "seed=0"], files={"error.txt": "error: optimizer.lr=-1: must be > 0 (e.g. optimizer.lr=3e-3)\n"})
    fake_run(root, "3", group="data.tasks=[b]", seed=0, tasks=["b"], scores={"b": 0.0})
    fake_run(root, "4", group="strategy=random", seed=0, tasks=["a", "b"], scores={"a": 0.6, "b": 0.2}, curve=[0.2, 0.4])
    fake_run(root, "5", group="strategy=none", seed=1, tasks=["a", "b"], scores={"a": 0.6, "b": 0.4},
             curve=[0.2, 0.5], compute={"optimizer_steps": 100, "trained_tokens": 1004})
    fake_job(root, "6", ["strategy=cpi", "seed=0"])
    fake_job(root, "7", ["strategy=cpi", "seed=1"], files={"train.log": "error: a first error\n[INFO] more\nerror: the last error\n"})
    fake_job(tmp_path / "sweep", "eval_out", ["runs=x"], job="eval")  # eval.py's own output dir is not a run
    return root


def test_failed_runs_are_listed_with_their_error_line(sweep: Path) -> None:
    runs, unfinished = report.load_runs([sweep], "test")
    assert [r.path.name for r in runs] == ["0", "1", "3", "4", "5"]  # the other runs still tabulate
    assert [(u.path.name, u.overrides, u.error) for u in unfinished] == [
        ("2", ["strategy=epi", "optimizer.lr=-1", "seed=0"], "error: optimizer.lr=-1: must be > 0 (e.g. optimizer.lr=3e-3)"),
        ("6", ["strategy=cpi", "seed=0"], report.NO_ERROR),
        ("7", ["strategy=cpi", "seed=1"], "error: the last error"),
    ]


def test_no_finished_run_names_the_split(sweep: Path) -> None:
    with pytest.raises(UserError, match=r"none of the 1 run directories has eval_val.json.*eval.split=val.*first error: error: the last error"):
        report.load_runs([sweep / "7"], "val")
    with pytest.raises(UserError, match=r"none of the 8 .*first error: error: optimizer.lr=-1"):
        report.load_runs([sweep], "val")


def test_settings_in_sweep_order_experts_last(sweep: Path) -> None:
    runs, _ = report.load_runs([sweep], "test")
    tasks, rows = report.score_table(runs)
    assert [r["setting"] for r in rows] == ["strategy=none", "strategy=random", "data.tasks=[a]", "data.tasks=[b]"]
    assert list(report.by_setting(runs)) == [r["setting"] for r in rows]


def test_a_task_whose_expert_scored_0_is_named(sweep: Path) -> None:
    runs, _ = report.load_runs([sweep], "test")
    assert report.left_out_of_normalised(runs) == {"b": "its expert scored 0"}
    del runs[0]  # without a's expert: a has no ratio either
    assert report.left_out_of_normalised(runs) == {"a": "no single-task expert among these runs", "b": "its expert scored 0"}
    assert report.left_out_of_normalised([r for r in runs if r.expert_of is None]) == {}  # no experts: no normalised score at all


def test_compute_columns_are_the_mean_over_seeds_or_a_dash(sweep: Path) -> None:
    runs, _ = report.load_runs([sweep], "test")
    assert runs[1].compute == {"steps": 100, "tokens": 1000} and runs[0].compute == {}
    _, rows = report.score_table(runs)
    by = {r["setting"]: r for r in rows}
    assert (by["strategy=none"]["steps"], by["strategy=none"]["tokens"]) == (100, 1002)
    assert by["strategy=random"]["steps"] is None  # an older run: no compute events
    runs[4].compute = {}  # one seed of a setting lacks them: no mean over the others
    assert report.score_table(runs)[1][0]["tokens"] is None


def test_experts_are_a_dashed_reference_in_their_own_panel_not_in_avg(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, _ = report.load_runs([sweep], "test")
    curves = report.score_curves(runs, "test")
    assert list(curves["avg"]) == ["strategy=none", "strategy=random"]  # a's expert logged avg_score too
    assert curves["a"]["data.tasks=[a]"] == {10: [0.4], 20: [0.8]}
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out, rect=None: drawn.setdefault("fig", fig))
    plots.plot_scores_over_steps(curves, tmp_path / "p.png", "t", experts={"data.tasks=[a]"})
    axes = {ax.get_title(): ax for ax in drawn["fig"].axes}
    styles = {line.get_label(): line.get_linestyle() for line in axes["a"].get_lines()}
    assert styles == {"strategy=none": "-", "data.tasks=[a]": "--"}
    assert "data.tasks=[a]" not in {line.get_label() for line in axes["avg"].get_lines()}
    assert "data.tasks=[a] (expert)" in [t.get_text() for t in drawn["fig"].legends[0].get_texts()]


def test_forgetting_sign_and_range_as_documented() -> None:
    """Hand-computed: forgetting is the drop from a task's best score before the last stage, not clipped at 0."""
    mixed = report.Run(path=Path("x"), setting="s", seed=0, tasks=["a", "b", "c"], scores={}, stages=[["a"], ["b"], ["c"]],
                       matrix=[{"a": 0.5, "b": 0.0, "c": 0.0}, {"a": 0.4, "b": 0.6, "c": 0.1}, {"a": 0.7, "b": 0.2, "c": 0.9}])
    # bwt: ((0.7 - 0.5) + (0.2 - 0.6)) / 2; forgetting: ((max(0.5, 0.4) - 0.7) + (max(0.0, 0.6) - 0.2)) / 2
    t = report.transfer(mixed)
    assert {k: t[k] for k in ("bwt", "forgetting", "delta_A", "delta_B")} == pytest.approx(
        {"bwt": -0.1, "forgetting": 0.1, "delta_A": 0.7 - 0.4, "delta_B": 0.9 - 0.1})
    assert math.isnan(t["loss_A_before"]) and math.isnan(t["loss_A_after"])  # no after-stage losses logged
    gain = report.Run(path=Path("x"), setting="s", seed=0, tasks=["a", "b"], scores={}, stages=[["a"], ["b"]],
                      matrix=[{"a": 0.3, "b": 0.0}, {"a": 0.8, "b": 0.9}])
    t = report.transfer(gain)
    assert t["forgetting"] == pytest.approx(-0.5) and t["bwt"] == pytest.approx(0.5)  # the last stage lifted a: negative
    for run in (mixed, gain):
        t = report.transfer(run)
        assert -1 <= t["forgetting"] <= 1 and t["forgetting"] >= -t["bwt"] - 1e-12


def test_a_loss_before_and_after_the_last_stage() -> None:
    """loss_A_*: the first stage's tasks' mean test loss after the stage before the last, and after the last."""
    run = report.Run(path=Path("x"), setting="s", seed=0, tasks=["a", "c", "b"], scores={}, stages=[["a", "c"], ["b"]],
                     matrix=[{"a": 0.9, "b": 0.0, "c": 0.5}, {"a": 0.0, "b": 0.5, "c": 0.5}],
                     losses=[{"a": 0.1, "b": 4.0, "c": 0.3}, {"a": 1.5, "b": 0.2, "c": 0.5}])
    t = report.transfer(run)
    assert t["loss_A_before"] == pytest.approx(0.2) and t["loss_A_after"] == pytest.approx(1.0)
    run.losses[1] = {"a": 1.5, "b": 0.2}  # a task of A without its loss: no partial mean
    assert math.isnan(report.transfer(run)["loss_A_after"])


@pytest.mark.slow
def test_eval_py_report_sections(sweep: Path, tmp_path: Path) -> None:
    out, md = eval_report(sweep, tmp_path)
    assert "| setting | seeds | a | b | avg | normalised | steps | tokens |" in md
    assert "| strategy=none | 2 | 0.500 ± 0.141 | 0.300 ± 0.141 | 0.400 ± 0.141 | 0.625 | 100 | 1002 |" in md
    assert md.index("| strategy=random |") < md.index("| data.tasks=[a] |") < md.index("| data.tasks=[b] |")
    assert "| strategy=random | 1 | 0.600 ± 0.000 | 0.200 ± 0.000 | 0.400 ± 0.000 | 0.750 | – | – |" in md
    assert "\n\nLeft out of the normalised score: b (its expert scored 0).\n" in md
    assert "## Runs that did not finish" in md
    assert f"- {sweep / '2'} (strategy=epi,optimizer.lr=-1,seed=0): error: optimizer.lr=-1: must be > 0 (e.g. optimizer.lr=3e-3)" in md
    assert f"- {sweep / '6'} (strategy=cpi,seed=0): {report.NO_ERROR}" in md
    assert "eval_out" not in md
    data = json.loads((out / "report.json").read_text())
    assert data["left_out_of_normalised"] == {"b": "its expert scored 0"}
    assert data["unfinished"][0] == {"path": str(sweep / "2"), "name": "strategy=epi,optimizer.lr=-1,seed=0",
                                     "overrides": ["strategy=epi", "optimizer.lr=-1", "seed=0"], "error": "error: optimizer.lr=-1: must be > 0 (e.g. optimizer.lr=3e-3)"}
    assert (out / "scores.csv").read_text().splitlines()[1].endswith(",0.625,100,1002")
    assert (out / "scores_over_steps.png").is_file()


def test_runs_that_differ_only_in_bookkeeping_overrides_are_seeds_of_one_setting(tmp_path: Path) -> None:
    """A sweep continued with another logger or thread count adds seeds to its settings, not new settings."""
    fake_run(tmp_path, "0", group="+arm=epi,logger.mode=disabled", seed=0, tasks=["a"], scores={"a": 0.2})
    fake_run(tmp_path, "1", group="+arm=epi", seed=1, tasks=["a"], scores={"a": 0.4})
    fake_run(tmp_path, "2", group="+arm=epi,logger=jsonl,threads=1", seed=2, tasks=["a"], scores={"a": 0.6})
    fake_run(tmp_path, "3", group="+arm=epi,strategy.p=0.1", seed=0, tasks=["a"], scores={"a": 0.9})
    groups = report.by_setting([report.load_run(tmp_path / str(n), "test") for n in range(4)])
    assert sorted(groups) == ["+arm=epi", "+arm=epi,strategy.p=0.1"]
    assert [r.seed for r in groups["+arm=epi"]] == [0, 1, 2]
    # and runs trained now get such a group in the first place (their W&B group, the setting eval.py reads)
    assert setting_name(["+arm=epi", "seed=1", "logger=jsonl", "threads=1", "logger.mode=disabled"]) == "+arm=epi"
    assert setting_name(["seed=0"]) == "default"
