"""eval.py runs=...: intervals over seeds, the paired bootstrap against the baseline, retention columns, the general
checks before and after, the unscored tasks' ratings and perplexities.

Fabricated run directories with known per-example scores, so every number below is checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from epi import report
from epi.errors import UserError
from epi.report import write_report
from tests.helpers import run_script
from tests.test_report import fake_run

N = 40  # test examples per task


def eval_report(runs: Path, tmp_path: Path, **options) -> tuple[Path, str]:
    """The report over `runs` into tmp_path/out, built in-process (eval.py runs=... is tests/test_report.py's):
    the out directory and its report.md."""
    out = tmp_path / "out"
    write_report(runs, out, **options)
    return out, (out / "report.md").read_text()


def predictions(run: Path, per_task: dict[str, list[float]], *, shuffle: int | None = None) -> None:
    """predictions_test.jsonl as train.py writes it: one record per example; `shuffle` reorders the lines
    (a run may list its examples in another order: matching is by content, not position)."""
    records = [{"task": t, "prompt": f"{t} question {i}", "reference": f"{t} answer {i}", "prediction": "x", "score": s, "loss": 1.0}
               for t, scores in per_task.items() for i, s in enumerate(scores)]
    if shuffle is not None:
        records = [records[i] for i in np.random.default_rng(shuffle).permutation(len(records))]
    (run / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def arm(root: Path, group: str, seed: int, per_task: dict[str, list[float]], **kwargs) -> Path:
    """A finished multi-task run whose eval_test.json agrees with its predictions."""
    run = fake_run(root, f"{group}-{seed}".replace("+", ""), group=group, seed=seed, tasks=sorted(per_task),
                   scores={t: sum(s) / len(s) for t, s in per_task.items()}, **kwargs)
    predictions(run, per_task)
    return run


def retention(run: Path, before: float, after: float, sha: str = "a" * 64) -> None:
    data = {"corpus_sha256": sha, "passages": 8, "tokens_per_passage": 64,
            "before": {"loss": math.log(before), "perplexity": before, "tokens": 504.0},
            "after": {"loss": math.log(after), "perplexity": after, "tokens": 504.0}}
    (run / "retention.json").write_text(json.dumps(data))


def scores(first_right: int) -> list[float]:
    """N examples, the first `first_right` answered right."""
    return [1.0] * first_right + [0.0] * (N - first_right)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """`none` right on 10 (seed 0) or 12 (seed 1) of each task's 40; `good` on 30; `same` exactly as `none`;
    `mixed` wins 10 examples and loses 10 others; `worse` right on none; `good` has a seed 2 that `none` lacks."""
    root = tmp_path / "sweep"
    for seed, right in ((0, 10), (1, 12)):
        arm(root, "+arm=none", seed, {"a": scores(right), "b": scores(right)})
        arm(root, "+arm=same", seed, {"a": scores(right), "b": scores(right)})
        mixed = [0.0] * 10 + [1.0] * (right - 10) + [1.0] * 10 + [0.0] * (N - right - 10)  # none's first 10 lost, the next 10 won
        arm(root, "+arm=mixed", seed, {"a": mixed, "b": mixed})
        arm(root, "+arm=worse", seed, {"a": scores(0), "b": scores(0)})
    for seed in (0, 1, 2):
        arm(root, "+arm=good", seed, {"a": scores(30), "b": scores(30 if seed < 2 else 0)})
    return root


def test_t_quantiles_table_and_expansion() -> None:
    assert report.t_quantile_975(1) == pytest.approx(12.7062047, abs=1e-6)
    assert report.t_quantile_975(2) == pytest.approx(4.3026527, abs=1e-6)
    assert report.t_quantile_975(30) == pytest.approx(2.0422725, abs=1e-6)
    # beyond the table (reference values of t(0.975, df))
    for df, t in ((31, 2.0395134), (60, 2.0002978), (120, 1.9799304), (10_000, 1.9602012)):
        assert report.t_quantile_975(df) == pytest.approx(t, abs=1e-6)
    with pytest.raises(ValueError):
        report.t_quantile_975(0)


def test_summarize_gives_the_student_t_interval() -> None:
    two = report.summarize([0.4, 0.6])  # s = 0.141421, t(0.975, 1) = 12.7062: half-width 12.7062 * 0.141421 / sqrt(2) = 1.270620
    assert (two.mean, two.std, two.n) == pytest.approx((0.5, 0.1414214, 2))
    assert (two.ci_low, two.ci_high) == pytest.approx((0.5 - 1.2706205, 0.5 + 1.2706205))
    three = report.summarize([0.2, 0.4, 0.9])  # s = sqrt(0.13), t(0.975, 2) = 4.302653: half-width 4.302653 * 0.208167 = 0.895669
    assert (three.ci_low, three.ci_high) == pytest.approx((-0.3956686, 1.3956686))
    one = report.summarize([0.7])
    assert (one.mean, one.std, one.n, one.ci_low, one.ci_high) == (0.7, 0.0, 1, None, None)
    assert report.fmt_interval(two) == "0.500 [-0.771, 1.771]" and report.fmt_interval(one) == "0.700 [–]"
    assert report.fmt(two) == "0.500 ± 0.141"  # the mean ± std tables read as before


def test_intervals_in_the_report_csv_and_json(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, (a, b) in enumerate(((0.4, 0.2), (0.6, 0.4))):
        fake_run(root, f"none{seed}", group="strategy=none", seed=seed, tasks=["a", "b"], scores={"a": a, "b": b})
        fake_run(root, f"seq{seed}", group="seq", seed=seed, tasks=["a", "b"], scores={"a": 0.3, "b": 0.9}, stages=[["a"], ["b"]],
                 matrix=[{"a": 0.7, "b": 0.1}, {"a": 0.3 + 0.2 * seed, "b": 0.9}])
    out, md = eval_report(root, tmp_path)
    assert "| strategy=none | 2 | 0.500 ± 0.141 | 0.300 ± 0.141 | 0.400 ± 0.141 |" in md  # unchanged
    assert "95% intervals over seeds (Student t" in md
    assert "| strategy=none | 2 | 0.500 [-0.771, 1.771] | 0.300 [-0.971, 1.571] | 0.400 [-0.871, 1.671] |" in md
    # seq's delta_A: -0.4 and -0.2 (s = 0.141421): the same half-width 1.270620 around -0.3
    assert "| seq | 2 | -0.300 [-1.571, 0.971] |" in md
    data = json.loads((out / "report.json").read_text())
    avg = next(r for r in data["scores"] if r["setting"] == "strategy=none")["avg"]
    assert avg == pytest.approx({"mean": 0.4, "std": 0.1414214, "n": 2, "ci_low": 0.4 - 1.2706205, "ci_high": 0.4 + 1.2706205})
    assert data["transfer"][0]["delta_A"]["ci_high"] == pytest.approx(-0.3 + 1.2706205)
    row = (out / "scores.csv").read_text().splitlines()[1].split(",")
    assert row[:6] == ["strategy=none", "2", "0.5", "0.141421", "-0.77062", "1.77062"]
    assert (out / "transfer.csv").read_text().startswith("setting,seeds,delta_A_mean,delta_A_std,delta_A_ci_low,delta_A_ci_high,")


def test_paired_bootstrap_resolves_a_clear_gain_and_not_a_tie(sweep: Path) -> None:
    runs, _ = report.load_runs([sweep], "test")
    report.shorten(runs)
    baselines, comparisons, skipped = report.compare_to_baseline(runs, "test", None)
    assert baselines == ["arm=none"] and skipped == {}
    by = {c.setting: c for c in comparisons}
    assert list(by) == ["arm=good", "arm=mixed", "arm=same", "arm=worse"]  # the sweep's (here: the directories') order
    good = by["arm=good"]
    # seeds both have: 0 and 1 (good's seed 2, which scored 0 on b, is left out); per task (30 - 10 + 30 - 12) / 2 / 40
    assert good.seeds == [0, 1] and good.avg.examples == 2 * N
    assert good.avg.diff == pytest.approx(19 / 40) and good.tasks["a"].diff == pytest.approx(19 / 40)
    assert 0 < good.avg.ci_low < good.avg.diff < good.avg.ci_high and good.verdict == "beats"
    same = by["arm=same"]
    assert (same.avg.diff, same.avg.ci_low, same.avg.ci_high, same.verdict) == (0.0, 0.0, 0.0, "no resolved difference")
    mixed = by["arm=mixed"]
    assert mixed.avg.diff == pytest.approx(0.0) and mixed.avg.ci_low < 0 < mixed.avg.ci_high and mixed.verdict == "no resolved difference"
    assert by["arm=worse"].avg.ci_high < 0 and by["arm=worse"].verdict == "trails"
    again = report.compare_to_baseline(runs, "test", None)[1]
    assert [c.avg for c in again] == [c.avg for c in comparisons]  # a fixed seed: the same interval every time


def test_bootstrap_is_stratified_by_task_and_its_average_is_the_tables() -> None:
    """Δavg is the unweighted mean of the task means (not of the pooled examples), and each resample keeps
    every task's size: with a task of all +1 and one of all 0, every resample's average is exactly 0.5."""
    diffs = {"big": np.zeros(200), "small": np.ones(5)}
    avg, per_task = report.paired_bootstrap(diffs, resamples=500)
    assert (avg.diff, avg.ci_low, avg.ci_high, avg.examples) == (0.5, 0.5, 0.5, 205)
    assert per_task["small"] == report.Paired(1.0, 1.0, 1.0, 5)


def test_matching_by_example_not_by_position(tmp_path: Path) -> None:
    """One side lists its examples in another order, the other evaluated fewer: only common examples pair up."""
    base = arm(tmp_path, "strategy=none", 0, {"a": scores(10)})
    other = arm(tmp_path, "strategy=epi", 0, {"a": scores(10)[:30]})
    predictions(other, {"a": scores(10)[:30]}, shuffle=3)
    diffs = report.example_differences([report.load_predictions(other, "test")], [report.load_predictions(base, "test")])
    assert list(diffs) == ["a"] and len(diffs["a"]) == 30 and not diffs["a"].any()


def test_duplicate_examples_stay_apart_and_unscored_tasks_are_left_out(tmp_path: Path) -> None:
    records = [{"task": "a", "prompt": "p", "reference": "r", "prediction": "x", "score": s, "loss": 1.0} for s in (1.0, 0.0)]
    records.append({"task": "chat", "prompt": "p", "reference": "r", "prediction": None, "score": None, "loss": 2.0})
    (tmp_path / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert report.load_predictions(tmp_path, "test") == {("a", "p", "r", 0): 1.0, ("a", "p", "r", 1): 0.0}
    assert report.load_predictions(tmp_path, "val") is None


def test_each_arm_is_read_against_the_baseline_of_its_own_pair() -> None:
    settings = {s: frozenset(s.split(";")) for s in
                ("arm=none;pair=[code,math]", "arm=none;pair=[format,instruct]", "arm=epi;pair=[code,math]", "arm=epi;pair=[format,instruct]", "arm=epi")}
    assert report.baselines_of(settings, frozenset({"arm=none"})) == {
        "arm=epi;pair=[code,math]": "arm=none;pair=[code,math]",
        "arm=epi;pair=[format,instruct]": "arm=none;pair=[format,instruct]",
        "arm=epi": None,  # both baselines fit equally: no guess
    }


def test_the_baseline_key_chooses_the_reference(sweep: Path, tmp_path: Path) -> None:
    runs, _ = report.load_runs([sweep], "test")
    report.shorten(runs)
    baselines, comparisons, _ = report.compare_to_baseline(runs, "test", "+arm=good")
    assert baselines == ["arm=good"] and all(c.baseline == "arm=good" for c in comparisons)
    assert {c.setting: c.verdict for c in comparisons}["arm=none"] == "trails"
    with pytest.raises(UserError, match=r"baseline='arm=nothing': no setting among these runs has these overrides"):
        report.compare_to_baseline(runs, "test", "arm=nothing")
    without = [r for r in runs if r.setting != "arm=none"]
    assert report.compare_to_baseline(without, "test", None) == ([], [], {})  # no `none`: no comparison, no error

    out, md = eval_report(sweep, tmp_path, baseline="arm=same")
    assert "## Against the baseline (arm=same): paired bootstrap over test examples" in md
    assert "10000 bootstrap resamples of the examples, stratified by task" in md
    assert "| setting | baseline | seeds | examples | Δavg [95% CI] | verdict | a | b |" in md
    assert "| arm=good | arm=same | 2 | 80 | +0.475 [" in md and "| beats |" in md
    data = json.loads((out / "report.json").read_text())
    assert data["baseline"] == ["arm=same"] and data["bootstrap"]["resamples"] == 10_000
    good = next(c for c in data["vs_baseline"] if c["setting"] == "arm=good")
    assert good["seeds"] == [0, 1] and good["verdict"] == "beats" and good["avg"]["diff"] == pytest.approx(0.475)
    assert good["avg"]["ci_low"] > 0 and set(good["tasks"]) == {"a", "b"}


def test_runs_without_predictions_and_sequential_runs_are_said(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    arm(root, "strategy=none", 0, {"a": scores(10), "b": scores(10)})
    fake_run(root, "old", group="strategy=epi", seed=0, tasks=["a", "b"], scores={"a": 0.5, "b": 0.5})  # before predictions were written
    arm(root, "strategy=random", 5, {"a": scores(10), "b": scores(10)})
    arm(root, "seq", 0, {"a": scores(20), "b": scores(20)}, stages=[["a"], ["b"]], matrix=[{"a": 0.5, "b": 0.0}, {"a": 0.5, "b": 0.5}])
    out, md = eval_report(root, tmp_path)
    assert "| seq | strategy=none | 1 | 80 | +0.250 [" in md
    assert "Compared on their final predictions only, as they (or their baseline) trained in stages: seq." in md
    assert ("Not compared: strategy=epi (its runs have no predictions_test.jsonl); strategy=random (no seed in common with "
            "the baseline (strategy=none: seeds [0]; this setting: [5]))." in md)


def test_retention_columns_mean_and_interval(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, after in ((0, 12.0), (1, 14.0)):
        retention(fake_run(root, f"n{seed}", group="strategy=none", seed=seed, tasks=["a", "b"], scores={"a": 0.5, "b": 0.5}), 10.0, after)
    fake_run(root, "e0", group="strategy=epi", seed=0, tasks=["a", "b"], scores={"a": 0.5, "b": 0.5})  # retention off
    runs, _ = report.load_runs([root], "test")
    assert report.retention_columns(runs) == ["retention ppl before", "retention ppl after"]
    assert report.retention_columns([r for r in runs if r.retention is None]) == []
    out, md = eval_report(root, tmp_path)
    assert "| normalised | steps | tokens | retention ppl before | retention ppl after |" in md
    # after: 12 and 14, s = 1.414214, half-width 12.7062 * 1.414214 / sqrt(2) = 12.706205
    assert "| strategy=none | 2 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | – | – | – | 10.000 ± 0.000 | 13.000 ± 1.414 |" in md
    assert "| 10.000 [10.000, 10.000] | 13.000 [0.294, 25.706] |" in md
    assert "| strategy=epi | 1 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | – | – | – | – | – |" in md
    assert "Retention left out" not in md
    assert (out / "scores.csv").read_text().splitlines()[0].endswith(",retention_ppl_after_mean,retention_ppl_after_std,retention_ppl_after_ci_low,retention_ppl_after_ci_high")


def general(run: Path, before: dict[str, float] | None, after: dict[str, float], split: str = "test") -> None:
    """general.json as epi.general.write_general writes it (a pass_at_1 check has a score and no loss)."""
    data = {"split": split, "before": None if before is None else {t: {"score": v} for t, v in before.items()},
            "after": {t: {"score": v} for t, v in after.items()}}
    (run / "general.json").write_text(json.dumps(data))


def test_general_checks_before_after_and_change_over_seeds(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, (before, after) in enumerate(((0.10, 0.06), (0.12, 0.10))):
        general(fake_run(root, f"n{seed}", group="strategy=none", seed=seed, tasks=["a"], scores={"a": 0.5}), {"humaneval": before},
                {"humaneval": after})
    general(fake_run(root, "e0", group="strategy=epi", seed=0, tasks=["a"], scores={"a": 0.5}), None, {"humaneval": 0.2})  # no before
    fake_run(root, "r0", group="strategy=random", seed=0, tasks=["a"], scores={"a": 0.5})  # no checks at all
    out, md = eval_report(root, tmp_path)
    assert "## General ability (eval.general.tasks" in md and "The test split, mean ± std over seeds" in md
    assert "| setting | seeds | humaneval before | humaneval after | humaneval Δ |" in md
    # before 0.10, 0.12; after 0.06, 0.10; Δ -0.04, -0.02 (s = 0.014142: half-width 12.7062 * 0.014142 / sqrt(2) = 0.127062)
    assert "| strategy=none | 2 | 0.110 ± 0.014 | 0.080 ± 0.028 | -0.030 ± 0.014 |" in md
    assert "| strategy=none | 2 | 0.110 [-0.017, 0.237] | 0.080 [-0.174, 0.334] | -0.030 [-0.157, 0.097] |" in md
    assert "| strategy=epi | 1 | – | 0.200 ± 0.000 | – |" in md  # no before: no change either
    assert "| strategy=random | 1 | – | – | – |" in md
    assert (out / "general.csv").read_text().startswith("setting,seeds,humaneval_before_mean,")
    data = json.loads((out / "report.json").read_text())["general"]
    assert data["split"] == "test" and data["columns"] == ["humaneval before", "humaneval after", "humaneval Δ"]


def test_general_checks_on_different_splits_are_not_averaged(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    general(fake_run(root, "0", group="strategy=none", seed=0, tasks=["a"], scores={"a": 0.5}), {"h": 0.1}, {"h": 0.2}, split="test")
    general(fake_run(root, "1", group="strategy=none", seed=1, tasks=["a"], scores={"a": 0.5}), {"h": 0.1}, {"h": 0.2}, split="val")
    _, md = eval_report(root, tmp_path)
    assert "Left out: the runs scored their general checks on different splits" in md


def test_judged_ratings_unparseable_counts_and_perplexities_get_their_own_table(tmp_path: Path) -> None:
    """A judged task and a perplexity-scored task have no score (a dash in the score table, not in `avg`); their own
    metrics are tabulated over seeds."""
    root = tmp_path / "runs"
    for seed, (rating, bad, ppl) in enumerate(((6.0, 1, 12.0), (8.0, 3, 14.0))):
        run = fake_run(root, f"n{seed}", group="strategy=none", seed=seed, tasks=["a", "chat", "text"], scores={"a": 0.5})
        results = {"a": {"score": 0.5, "loss": 1.0}, "chat": {"rating": rating, "judge_unparseable": bad, "loss": 1.0},
                   "text": {"perplexity": ppl, "loss": 2.5}}
        (run / "eval_test.json").write_text(json.dumps(results))
    run = fake_run(root, "e0", group="strategy=epi", seed=0, tasks=["a", "chat", "text"], scores={"a": 0.7})
    results = {"a": {"score": 0.7, "loss": 1.0}, "chat": {"judge_unparseable": 4, "loss": 1.0}, "text": {"perplexity": 9.0, "loss": 2.2}}
    (run / "eval_test.json").write_text(json.dumps(results))  # the judge parsed none of its judgements: no rating
    out, md = eval_report(root, tmp_path)
    assert "| strategy=none | 2 | 0.500 ± 0.000 | – | – | 0.500 ± 0.000 |" in md  # a, chat, text, avg: avg is a's alone
    assert "## Tasks without a score (test split" in md
    assert "| setting | seeds | chat rating | chat judge_unparseable | text perplexity |" in md
    assert "| strategy=none | 2 | 7.000 ± 1.414 | 2.000 ± 1.414 | 13.000 ± 1.414 |" in md
    assert "| strategy=epi | 1 | – | 4.000 ± 0.000 | 9.000 ± 0.000 |" in md
    assert "| strategy=none | 2 | 7.000 [-5.706, 19.706] |" in md
    assert (out / "unscored.csv").read_text().startswith("setting,seeds,chat_rating_mean,")
    assert json.loads((out / "report.json").read_text())["unscored"]["columns"] == ["chat rating", "chat judge_unparseable", "text perplexity"]


def test_a_report_without_general_checks_has_no_such_section(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    fake_run(root, "0", group="strategy=none", seed=0, tasks=["a"], scores={"a": 0.5})
    out, md = eval_report(root, tmp_path)
    assert "General ability" not in md and not (out / "general.csv").exists()
    assert "Tasks without a score" not in md and not (out / "unscored.csv").exists()


@pytest.mark.slow
def test_retention_on_different_corpora_is_not_averaged(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = fake_run(root, "0", group="strategy=none", seed=0, tasks=["a"], scores={"a": 0.5})
    second = fake_run(root, "1", group="strategy=none", seed=1, tasks=["a"], scores={"a": 0.5})
    retention(first, 10.0, 12.0, sha="1" * 64)
    retention(second, 10.0, 14.0, sha="2" * 64)
    runs, _ = report.load_runs([root], "test")
    assert report.score_table(runs)[1][0]["retention ppl after"] is None
    line = report.retention_mismatch(runs)
    assert line == (f"Retention left out: the runs measured it on different held-out text (corpus_sha256 {'1' * 12} in {first}; "
                    f"{'2' * 12} in {second}); their perplexities do not compare.")
    out = tmp_path / "out"
    proc = run_script("eval.py", f"runs={root}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"\n\n{line}\n\n" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["retention_corpora"] == {"1" * 64: [str(first)], "2" * 64: [str(second)]}
