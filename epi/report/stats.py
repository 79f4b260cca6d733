"""Statistics over runs: intervals over seeds, backward transfer and forgetting, the paired bootstrap against a baseline.

Definitions (also in the README):
- 95% interval over seeds of every mean over seeds (scores, average, transfer numbers, retention):
  Student's t, mean ± t(0.975, n-1) * s / sqrt(n), s the sample standard deviation of the n seeds'
  values; none for a single seed (s is undefined); not clipped to the metric's range.
- accuracy matrix of a sequential run: A[k][t] = score of task t after stage k.
- BWT (backward transfer) = mean over tasks trained before the last stage of
  A[last][t] - A[s(t)][t], s(t) the stage that trained t (< 0 means forgetting); forgetting =
  mean of max_k<last A[k][t] - A[last][t] over the same tasks, k over every stage before the
  last (also those before t was trained). Positive means forgetting; it is not clipped at 0: it
  is negative when the last stage lifted the earlier tasks above their best earlier score.
  Since s(t) < last, forgetting >= -BWT, and both lie in [-1, 1] for scores in [0, 1].
- delta_A / delta_B (the papers' "train A then B" table): the change over the last stage of
  the scores of the first stage's tasks (A: forgetting when negative) and of the last
  stage's tasks (B: the gain). loss_A_before / loss_A_after: the first stage's tasks' mean test
  loss before and after the last stage (forgetting that exact match cannot see: a score can sit
  at 0 while the loss says how much of A is left); nan for runs that logged no after-stage loss.
- paired comparison against the baseline setting (`baseline`, default the setting with `arm=none`,
  else `strategy=none`): per test example matched by (task, prompt, reference, occurrence), the
  mean score over the seeds both settings have, arm minus baseline; a bootstrap over examples,
  stratified by task (each task's examples resampled with replacement, its size kept), gives the
  95% percentile interval of each task's mean difference and of their unweighted mean (Δavg, the
  table's average). A setting beats (trails) the baseline only when the Δavg interval lies above
  (below) 0. Sequential runs are compared on their final predictions only: the evaluations after
  each stage are per task in the run's metrics, not per example.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epi import rundir
from epi.errors import UserError
from epi.report.runs import Key, Run, by_setting, load_predictions, split_overrides

TRANSFER = ("delta_A", "delta_B", "bwt", "forgetting", "loss_A_before", "loss_A_after")
DEFAULT_BASELINES = ("arm=none", "strategy=none")  # `baseline: null` takes the first one some setting has
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # one fresh generator per comparison: a setting's interval does not depend on the others in the report
# t(0.975, df) for df = 1..30 (the usual table, each checked against a numerical integral of the density to 1e-10;
# scipy is not a dependency); above 30 the Cornish-Fisher expansion in `t_quantile_975` (off by < 1e-7 there)
T_975 = (
    12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135, 2.262157163, 2.228138852,
    2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447,
    2.079613845, 2.073873068, 2.068657610, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456,
)
Z_975 = 1.959963984540054


@dataclass(frozen=True)
class Stat:
    """A mean over seeds with its spread and 95% t interval: what a table cell shows and report.json keeps."""

    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single seed, as the tables have always shown it
    n: int
    ci_low: float | None  # None for a single seed: one value has no spread to take an interval from
    ci_high: float | None


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table for df <= 30, else the Cornish-Fisher expansion around the normal quantile."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(g / df ** (k + 1) for k, g in enumerate(terms))


def summarize(values: Sequence[float]) -> Stat:
    """Mean, std and the 95% Student-t interval of per-seed values: with 2 to 5 seeds the normal 1.96
    would understate the interval by a factor of up to 6.5."""
    n = len(values)
    if any(math.isnan(v) for v in values):  # a run without the value (e.g. no after-stage loss): no mean to give
        return Stat(math.nan, math.nan, n, None, None)
    mean = statistics.fmean(values)
    if n < 2:
        return Stat(mean, 0.0, n, None, None)
    std = statistics.stdev(values)
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Stat(mean, std, n, mean - half, mean + half)


def transfer(run: Run) -> dict[str, float] | None:
    """BWT and forgetting of one sequential run (None if it had a single stage, or lacks a stage's evaluation)."""
    if len(run.matrix) < 2 or run.missing_stages:
        return None
    trained_at = {t: k for k, stage in enumerate(run.stages) for t in stage}
    earlier = [t for t, k in trained_at.items() if k < len(run.matrix) - 1 and t in run.matrix[-1]]
    if not earlier:
        return None
    last = run.matrix[-1]
    bwt = statistics.fmean(last[t] - run.matrix[trained_at[t]][t] for t in earlier)
    forgetting = statistics.fmean(max(m[t] for m in run.matrix[:-1]) - last[t] for t in earlier)
    # the papers' forgetting table: change of the first stage's tasks (A) and the last stage's (B)
    # over the last stage; tasks scored by perplexity have no score and take no part
    first, final = ([t for t in run.stages[k] if t in last] for k in (0, len(run.matrix) - 1))
    delta_a = statistics.fmean(last[t] - run.matrix[-2][t] for t in first) if first else math.nan
    delta_b = statistics.fmean(last[t] - run.matrix[-2][t] for t in final) if final else math.nan
    loss = {}
    for key, row in (("loss_A_before", run.losses[-2] if len(run.losses) >= 2 else None),
                     ("loss_A_after", run.losses[-1] if run.losses else None)):
        known = [row[t] for t in run.stages[0] if row and t in row]
        loss[key] = statistics.fmean(known) if known and len(known) == len(run.stages[0]) else math.nan
    return {"bwt": bwt, "forgetting": forgetting, "delta_A": delta_a, "delta_B": delta_b, **loss}


@dataclass(frozen=True)
class Paired:
    """Mean score difference (arm - baseline) over matched test examples, and its 95% bootstrap interval."""

    diff: float
    ci_low: float
    ci_high: float
    examples: int


@dataclass(frozen=True)
class Comparison:
    """One setting against its baseline on the test examples both were evaluated on."""

    setting: str
    baseline: str
    seeds: list[int]  # the seeds both settings have, each side averaged over them
    avg: Paired  # the unweighted mean over tasks, as the score table's `avg`
    tasks: dict[str, Paired]
    verdict: str  # "beats" / "trails" only when the avg interval excludes 0, else "no resolved difference"
    sequential: bool  # a side trained in stages: compared on its final predictions only


def example_differences(arm: list[dict[Key, float]], baseline: list[dict[Key, float]]) -> dict[str, np.ndarray]:
    """Per task, per example every run of both sides scored: the arm's mean over its runs minus the baseline's.

    Examples are sorted by key, so the bootstrap draws the same resamples in every process (set order of
    strings changes with Python's hash seed)."""
    common = sorted(set.intersection(*(set(p) for p in [*arm, *baseline])))
    diffs: dict[str, list[float]] = {}
    for key in common:
        diff = statistics.fmean(p[key] for p in arm) - statistics.fmean(p[key] for p in baseline)
        diffs.setdefault(key[0], []).append(diff)
    return {task: np.asarray(values) for task, values in sorted(diffs.items())}


def resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `resamples` samples of len(values) drawn with replacement, in chunks of at most ~4M indices
    so that a large test set does not need resamples x examples of memory at once."""
    n = len(values)
    per_chunk = max(1, 2**22 // n)
    out = np.empty(resamples)
    for start in range(0, resamples, per_chunk):
        m = min(per_chunk, resamples - start)
        out[start : start + m] = values[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return out


def paired_bootstrap(diffs: dict[str, np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[Paired, dict[str, Paired]]:
    """The mean difference of the average over tasks and of each task, with 95% percentile intervals.

    Stratified by task: each resample redraws every task's examples within that task, keeping its size, so
    the average stays the table's unweighted mean over tasks and a large task does not crowd out a small one."""
    rng = np.random.default_rng(seed)
    means = {task: resampled_means(d, resamples, rng) for task, d in diffs.items()}
    per_task = {task: _paired(float(d.mean()), means[task], len(d)) for task, d in diffs.items()}
    avg = _paired(statistics.fmean(p.diff for p in per_task.values()), np.mean(np.stack(list(means.values())), axis=0),
                  sum(len(d) for d in diffs.values()))
    return avg, per_task


def _paired(diff: float, resampled: np.ndarray, examples: int) -> Paired:
    low, high = np.percentile(resampled, [2.5, 97.5])
    return Paired(diff, float(low), float(high), examples)


def verdict(avg: Paired) -> str:
    """`beats` / `trails` only when the paired interval excludes 0: a difference inside it is not resolved."""
    if avg.ci_low > 0:
        return "beats"
    if avg.ci_high < 0:
        return "trails"
    return "no resolved difference"


def setting_overrides(runs: list[Run]) -> dict[str, frozenset[str]]:
    """setting label -> its full overrides (`+` stripped); a Run built without them falls back to its label."""
    return {r.setting: frozenset(r.overrides or (p.lstrip("+") for p in split_overrides(r.setting))) for r in runs}


def baseline_key(runs: list[Run], baseline: str | None) -> frozenset[str] | None:
    """The overrides that make a setting a baseline: `baseline`'s own (e.g. "arm=none" or a whole label), or, when
    it is None, the first of DEFAULT_BASELINES that some setting has; None when no setting has any of those.

    Raises a UserError for a given `baseline` that no setting has: a typo must not silently drop the comparison."""
    settings = setting_overrides(runs)
    for candidate in [baseline] if baseline is not None else DEFAULT_BASELINES:
        key = frozenset(p.strip().lstrip("+") for p in split_overrides(candidate))
        if any(key <= overrides for overrides in settings.values()):
            return key
    if baseline is not None:
        raise UserError(f"baseline={baseline!r}: no setting among these runs has these overrides; the settings: {sorted(settings)}")
    return None


def baselines_of(settings: dict[str, frozenset[str]], key: frozenset[str]) -> dict[str, str | None]:
    """Each non-baseline setting -> the baseline setting it is read against, or None.

    A setting's baseline is one with `key` whose other overrides it shares, so that with several baselines
    (table_forgetting: `arm=none` once per pair) an arm is read against the one of its own pair; the most
    specific such baseline when several fit, None when none fits or two fit equally."""
    bases = {s: overrides - key for s, overrides in settings.items() if key <= overrides}
    out: dict[str, str | None] = {}
    for setting, overrides in settings.items():
        if setting in bases:
            continue
        fits = [b for b, rest in bases.items() if rest <= overrides]
        most = max((len(bases[b]) for b in fits), default=0)
        best = [b for b in fits if len(bases[b]) == most]
        out[setting] = best[0] if len(best) == 1 else None
    return out


def compare_to_baseline(runs: list[Run], split: str, baseline: str | None, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> tuple[list[str], list[Comparison], dict[str, str]]:
    """(the baseline settings, each arm's Comparison in table order, the arms not compared -> why).

    Single-task experts are no arms (they are the normalised score's reference); all empty when there is no
    baseline (see `baseline_key`)."""
    key = baseline_key(runs, baseline)
    if key is None:
        return [], [], {}
    groups = by_setting(runs)
    overrides = setting_overrides(runs)
    arms = {s for s, g in groups.items() if not all(r.expert_of for r in g)}
    considered = {s: o for s, o in overrides.items() if s in arms or key <= o}
    mapping = baselines_of(considered, key)
    predictions = {r.path: load_predictions(r.path, split) for r in runs if r.setting in considered}
    comparisons, skipped = [], {}
    for setting in (s for s in groups if s in mapping):
        base = mapping[setting]
        if base is None:
            skipped[setting] = "no single baseline setting shares its other overrides"
            continue
        found = _compare(setting, groups[setting], base, groups[base], predictions, split, resamples, seed)
        if isinstance(found, str):
            skipped[setting] = found
        else:
            comparisons.append(found)
    return [s for s in groups if s in considered and key <= considered[s]], comparisons, skipped


def _compare(setting: str, arm: list[Run], base: str, baseline: list[Run], predictions: dict[Path, dict[Key, float] | None],
             split: str, resamples: int, seed: int) -> Comparison | str:
    """The Comparison of one arm with its baseline over the seeds both have, or why there is none."""
    arm_seeds = {r.seed for r in arm if predictions[r.path] is not None}
    base_seeds = {r.seed for r in baseline if predictions[r.path] is not None}
    if not arm_seeds:
        return f"its runs have no {rundir.predictions(split)}"
    if not base_seeds:
        return f"the baseline's runs ({base}) have no {rundir.predictions(split)}"
    seeds = sorted(arm_seeds & base_seeds)
    if not seeds:
        return f"no seed in common with the baseline ({base}: seeds {sorted(base_seeds)}; this setting: {sorted(arm_seeds)})"
    diffs = example_differences(_scores_of(arm, seeds, predictions), _scores_of(baseline, seeds, predictions))
    if not diffs:
        return f"no scored test example in common with the baseline ({base})"
    avg, per_task = paired_bootstrap(diffs, resamples, seed)
    sequential = any(len(r.stages) > 1 for r in (*arm, *baseline))
    return Comparison(setting, base, seeds, avg, per_task, verdict(avg), sequential)


def _scores_of(group: list[Run], seeds: list[int], predictions: dict[Path, dict[Key, float] | None]) -> list[dict[Key, float]]:
    """The per-example scores of a setting's runs with one of `seeds` (each has predictions: see `_compare`)."""
    return [scores for r in group if r.seed in seeds and (scores := predictions[r.path]) is not None]

