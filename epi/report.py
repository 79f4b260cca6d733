"""Tables over sets of runs, read from their run directories (no W&B needed).

A *setting* is a run's W&B group: its command-line overrides without the seed (and without the
bookkeeping keys `logger.*` and `threads`, which change no number), so the seeds of one setting are averaged. Definitions (also in the README):
- score: a task's exact-match score on the reported split (eval_<split>.json of each run).
- normalised score of a setting: mean over tasks of score(setting, t) / score(expert_t, t),
  where expert_t is the single-task run (data.tasks=[t]) under the same budget, both averaged
  over seeds; a task whose expert scores 0 has no normalised score (left out, and reported).
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
- compute of a setting: the optimizer steps and trained tokens its runs logged (split
  `compute`, probes included), mean over seeds; none when a run lacks them (older runs).
- 95% interval over seeds of every mean over seeds (scores, average, transfer numbers, retention):
  Student's t, mean ± t(0.975, n-1) * s / sqrt(n), s the sample standard deviation of the n seeds'
  values; none for a single seed (s is undefined); not clipped to the metric's range.
- retention: the held-out perplexity before and after training (retention.json), mean over seeds;
  none when a run of the setting lacks it, and for every setting when the runs' corpora differ
  (corpus_sha256): perplexities of different text do not compare.
- paired comparison against the baseline setting (`baseline`, default the setting with `arm=none`,
  else `strategy=none`): per test example matched by (task, prompt, reference, occurrence), the
  mean score over the seeds both settings have, arm minus baseline; a bootstrap over examples,
  stratified by task (each task's examples resampled with replacement, its size kept), gives the
  95% percentile interval of each task's mean difference and of their unweighted mean (Δavg, the
  table's average). A setting beats (trails) the baseline only when the Δavg interval lies above
  (below) 0. Sequential runs are compared on their final predictions only: the evaluations after
  each stage are per task in metrics.jsonl, not per example.
A run whose metrics lack a stage's evaluation keeps that row as a gap (None) and is left out
of the transfer numbers, with its name and the missing stages in the report. A run without
eval_<split>.json (failed, killed, or still running) is listed with its overrides and the
error line it left, so that a sweep's failures are not silently missing from the tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from epi.cli import is_bookkeeping
from epi.errors import UserError
from epi.logging import read_metrics

TRANSFER = ("delta_A", "delta_B", "bwt", "forgetting", "loss_A_before", "loss_A_after")
COMPUTE = {"steps": "optimizer_steps", "tokens": "trained_tokens"}  # score-table column: metric of the `compute` split
# train.py's own record of a failure, then Hydra's job log; train.py prints `error: ...` to
# stderr, which Hydra does not copy into the job log and the joblib launcher does not keep
ERROR_FILES = ("error.txt", "train.log")
NO_ERROR = "no error recorded (see the launcher's output)"
RETENTION = {"retention ppl before": "before", "retention ppl after": "after"}  # score-table column: side of retention.json
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
COMPARISON_COLUMNS = ["setting", "baseline", "seeds", "examples", "Δavg [95% CI]", "verdict"]


@dataclass
class Run:
    path: Path
    setting: str
    seed: int
    tasks: list[str]
    scores: dict[str, float]  # final score per task
    stages: list[list[str]] = field(default_factory=list)  # tasks trained in each stage
    matrix: list[dict[str, float] | None] = field(default_factory=list)  # after each stage: task -> score; None = not evaluated
    missing_stages: list[int] = field(default_factory=list)  # stages whose after-stage evaluation is not in metrics.jsonl
    losses: list[dict[str, float] | None] = field(default_factory=list)  # after each stage: task -> test loss, like `matrix`
    compute: dict[str, float] = field(default_factory=dict)  # COMPUTE column -> value; empty for runs from before it was logged
    retention: dict | None = None  # retention.json as written (Trainer.write_retention); None when the run measured none
    overrides: list[str] = field(default_factory=list)  # the group's overrides, `+` stripped, kept whole: `shorten` relabels `setting`

    @property
    def expert_of(self) -> str | None:
        return self.tasks[0] if len(self.tasks) == 1 else None


@dataclass
class Unfinished:
    """A run directory without eval_<split>.json: its job failed, was killed, or is still running."""

    path: Path
    overrides: list[str]  # the job's command-line overrides (.hydra/overrides.yaml), in full
    error: str  # the last `error:` line it left, or NO_ERROR
    name: str  # the overrides that tell it apart within the report (`shorten` drops the shared ones)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories under the given paths (a multirun dir, a run dir, or a mix), finished or not, in the
    sweep's order: Hydra's job numbers compare as numbers (2 before 10), so tables list the arms as swept.

    A run directory holds train.py's config.yaml and metrics.jsonl, or is a Hydra job of train.py: a run
    that failed before training leaves only that job's .hydra/ (eval.py's own jobs are not runs)."""
    found: set[Path] = set()
    for path in map(Path, paths):
        found |= {p.parent for p in path.rglob("config.yaml") if (p.parent / "metrics.jsonl").is_file()}
        found |= {p.parent.parent for p in path.rglob("hydra.yaml") if p.parent.name == ".hydra" and _job_name(p) == "train"}
    if not found:
        raise UserError(f"runs={[str(p) for p in paths]}: no run directories (train.py runs or their Hydra jobs) found there")
    return sorted(found, key=lambda d: [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in d.parts])


def _job_name(hydra_yaml: Path) -> str | None:
    return OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.name")


def load_runs(paths: list[Path], split: str) -> tuple[list[Run], list[Unfinished]]:
    """The runs with eval_<split>.json, and the others, each in the sweep's order.

    Raises a UserError when none finished: then the split is the likelier mistake than the runs."""
    found = find_runs(paths)
    done = [p for p in found if (p / f"eval_{split}.json").is_file()]
    if not done:
        first_error = next((e for e in map(error_line, found) if e != NO_ERROR), NO_ERROR)
        raise UserError(
            f"runs={[str(p) for p in paths]}: none of the {len(found)} run directories has eval_{split}.json: they did not "
            f"finish, or were evaluated on another split than eval.split={split} (first error: {first_error})"
        )
    return [load_run(p, split) for p in done], [unfinished(p) for p in found if p not in done]


def unfinished(path: Path) -> Unfinished:
    overrides = path / ".hydra" / "overrides.yaml"
    listed = list(OmegaConf.load(overrides)) if overrides.is_file() else []
    return Unfinished(path=path, overrides=listed, error=error_line(path), name=_label(listed, set()))


def error_line(run_dir: Path) -> str:
    """The last line starting with `error:` in the first of ERROR_FILES that has one, else NO_ERROR."""
    for name in ERROR_FILES:
        file = run_dir / name
        lines = [line for line in file.read_text(errors="replace").splitlines() if line.startswith("error:")] if file.is_file() else []
        if lines:
            return lines[-1]
    return NO_ERROR


def load_run(path: Path, split: str) -> Run:
    cfg = OmegaConf.load(path / "config.yaml")
    result = path / f"eval_{split}.json"
    if not result.is_file():
        raise UserError(f"{path}: no eval_{split}.json; the run did not finish (or was evaluated on another split)")
    final = json.loads(result.read_text())
    events = read_metrics(path)
    after: dict[int, dict[str, float]] = {}
    after_loss: dict[int, dict[str, float]] = {}
    prefix = f"{split}/after_stage"
    for e in events:
        if e["split"].startswith(prefix) and e["metric"] in ("score", "loss") and e["task"]:
            (after if e["metric"] == "score" else after_loss).setdefault(int(e["split"][len(prefix):]), {})[e["task"]] = e["value"]
    stages = _stages(path, cfg)
    # row k is stage k's: a stage without its evaluation stays a marked gap, never closed up by the next one
    expected = range(len(stages)) if len(stages) > 1 else sorted(after)
    # a run trained before bookkeeping overrides left the group (epi.cli.setting_name) still joins its setting
    overrides = [p for p in split_overrides(cfg.logger.group or "default") if not is_bookkeeping(p)]
    group = ",".join(overrides) or "default"
    retention = path / "retention.json"
    return Run(
        path=path,
        setting=group,
        seed=int(cfg.seed),
        tasks=list(cfg.data.tasks),
        scores={t: r["score"] for t, r in final.items() if "score" in r},  # perplexity-scored tasks have none
        stages=stages,
        matrix=[after.get(k) for k in expected],
        missing_stages=[k for k in expected if k not in after],
        losses=[after_loss.get(k) for k in expected],
        compute=_compute(events),
        retention=json.loads(retention.read_text()) if retention.is_file() else None,
        overrides=[p.lstrip("+") for p in split_overrides(group)],
    )


def _compute(events: list[dict]) -> dict[str, float]:
    """The COMPUTE metrics a run logged once at its end (split `compute`, no task)."""
    metrics = {metric: column for column, metric in COMPUTE.items()}
    return {metrics[e["metric"]]: e["value"] for e in events if e["split"] == "compute" and e["metric"] in metrics}


def _stages(path: Path, cfg) -> list[list[str]]:
    """Tasks of each stage: CPI/multistage groups, else schedule.stages, else one stage."""
    group_file = path / "cpi" / "groups.json"
    if group_file.is_file():
        return json.loads(group_file.read_text())["groups"]
    if cfg.schedule.stages:
        return [list(s.tasks) for s in cfg.schedule.stages]
    return [list(cfg.data.tasks)]


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


def split_overrides(setting: str) -> list[str]:
    """"a=1,b=[x,y]" -> ["a=1", "b=[x,y]"]: commas inside brackets belong to the value."""
    parts, depth, current = [], 0, ""
    for ch in setting:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def shorten(runs: list[Run], unfinished: Sequence[Unfinished] = ()) -> None:
    """Drop the overrides every run shares (e.g. experiment=..., model size) from the setting labels, and
    name the unfinished runs by the rest of theirs, so a failed arm reads like the arms around it."""
    parts = {r.setting: split_overrides(r.setting) for r in runs}
    labels = [*parts.values(), *(u.overrides for u in unfinished)]
    common = set.intersection(*(set(p) for p in labels)) if len(labels) > 1 else set()
    for r in runs:
        r.setting = _label(parts[r.setting], common)
    for u in unfinished:
        u.name = _label(u.overrides, common)


def _label(overrides: list[str], common: set[str]) -> str:
    return ",".join(p.lstrip("+") for p in overrides if p not in common) or "default"


def by_setting(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs per setting in the sweep's order (of each setting's first run), single-task experts last:
    they are the reference the multi-task settings are read against, not one of the arms."""
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.setting, []).append(run)
    return dict(sorted(out.items(), key=lambda item: all(r.expert_of for r in item[1])))


def multitask_tasks(runs: list[Run]) -> list[str]:
    """The score table's task columns: the tasks of the runs that are not single-task experts."""
    return sorted({t for r in runs if r.expert_of is None for t in r.tasks})


def expert_means(runs: list[Run]) -> dict[str, float]:
    """Each expert's score on its task, mean over seeds (a perplexity-scored expert has none)."""
    scores: dict[str, list[float]] = {}
    for r in runs:
        if r.expert_of in r.scores:
            scores.setdefault(r.expert_of, []).append(r.scores[r.expert_of])
    return {t: statistics.fmean(v) for t, v in scores.items()}


def left_out_of_normalised(runs: list[Run]) -> dict[str, str]:
    """Scored tasks the normalised score skips, and why; empty when no run is an expert (no normalised score)."""
    means = expert_means(runs)
    if not means:
        return {}
    scored = [t for t in multitask_tasks(runs) if any(t in r.scores for r in runs)]
    return {t: "its expert scored 0" if t in means else "no single-task expert among these runs" for t in scored if not means.get(t)}


def score_table(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """Rows per setting (see `by_setting` for the order): per-task `Stat` over seeds, average, normalised
    score vs the experts, the compute spent (COMPUTE columns) and, when measured, retention (RETENTION columns)."""
    tasks = multitask_tasks(runs)
    expert_mean = expert_means(runs)
    comparable = retention_mismatch(runs) is None
    rows = []
    for setting, group in by_setting(runs).items():
        row: dict = {"setting": setting, "seeds": len(group)}
        for t in tasks:
            values = [r.scores[t] for r in group if t in r.scores]
            row[t] = summarize(values) if values else None
        per_seed_avg = [statistics.fmean(r.scores[t] for t in tasks if t in r.scores) for r in group if any(t in r.scores for t in tasks)]
        row["avg"] = summarize(per_seed_avg) if per_seed_avg else None
        ratios = [row[t].mean / expert_mean[t] for t in tasks if row.get(t) and expert_mean.get(t)]
        row["normalised"] = statistics.fmean(ratios) if ratios else None
        for column in COMPUTE:
            values = [r.compute.get(column) for r in group]
            row[column] = None if None in values else round(statistics.fmean(values))  # a mean over part of the seeds would misstate it
        for column in retention_columns(runs):
            row[column] = retention_stat(group, RETENTION[column]) if comparable else None
        rows.append(row)
    return tasks, rows


def retention_columns(runs: list[Run]) -> list[str]:
    """The score table's retention columns: both when some run measured retention, else none."""
    return list(RETENTION) if any(r.retention for r in runs) else []


def retention_corpora(runs: list[Run]) -> dict[str, list[Path]]:
    """corpus_sha256 -> the runs measured on that held-out text, in the sweep's order."""
    corpora: dict[str, list[Path]] = {}
    for r in runs:
        if r.retention:
            corpora.setdefault(r.retention["corpus_sha256"], []).append(r.path)
    return corpora


def retention_mismatch(runs: list[Run]) -> str | None:
    """The report's line when the runs measured retention on different text (so no column is filled), else None."""
    corpora = retention_corpora(runs)
    if len(corpora) < 2:
        return None
    named = "; ".join(f"{sha[:12]} in {', '.join(map(str, paths))}" for sha, paths in corpora.items())
    return f"Retention left out: the runs measured it on different held-out text (corpus_sha256 {named}); their perplexities do not compare."


def retention_stat(group: list[Run], side: str) -> Stat | None:
    """Perplexity `side` ("before" / "after") over a setting's seeds; None unless every seed has it (a mean over
    part of the seeds would misstate it, as for compute)."""
    values = [(r.retention or {}).get(side) for r in group]
    return None if None in values else summarize([v["perplexity"] for v in values])


def score_curves(runs: list[Run], split: str) -> dict[str, dict[str, dict[int, list[float]]]]:
    """`curves[panel][setting][step]`, one value per seed: a panel per task and `avg`, settings in table order.

    An expert's scores go to its own task's panel only: its average is one task's score, and in the
    `avg` panel it would read as a multi-task average."""
    curves: dict[str, dict[str, dict[int, list[float]]]] = {task: {} for task in [*multitask_tasks(runs), "avg"]}
    for group in by_setting(runs).values():
        for run in group:
            for e in read_metrics(run.path):
                if e["split"] != split or e["metric"] not in ("score", "avg_score"):
                    continue
                panel = e["task"] if e["metric"] == "score" else "avg"
                if run.expert_of is None or panel == run.expert_of:
                    curves.setdefault(panel, {}).setdefault(run.setting, {}).setdefault(e["step"], []).append(e["value"])
    return {panel: c for panel, c in curves.items() if c}


def core_overlap(group: list[Run]) -> tuple[list[str], list[list[float]]] | None:
    """CPI's core-overlap (Jaccard) matrix averaged over a setting's seeds; None for non-CPI settings."""
    found = [json.loads(f.read_text()) for f in (r.path / "cpi" / "overlap.json" for r in group) if f.is_file()]
    if not found:
        return None
    tasks = found[0]["tasks"]
    if any(o["tasks"] != tasks for o in found):
        raise UserError(f"core overlaps of one setting list different tasks: {[o['tasks'] for o in found]}")
    return tasks, [[statistics.fmean(o["jaccard"][i][j] for o in found) for j in range(len(tasks))] for i in range(len(tasks))]


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


Key = tuple[str, str, str, int]  # a test example: (task, prompt, reference, occurrence of that triple in the file)


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


def load_predictions(run_dir: Path, split: str) -> dict[Key, float] | None:
    """Each scored example's score from predictions_<split>.jsonl; None when the run has no such file.

    The occurrence count in the key keeps a test set's duplicate examples apart instead of letting one
    overwrite the other. Perplexity-scored tasks (score null) generate nothing to compare and are left out."""
    file = run_dir / f"predictions_{split}.jsonl"
    if not file.is_file():
        return None
    seen: Counter[tuple[str, str, str]] = Counter()
    scores: dict[Key, float] = {}
    for line in file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        triple = (record["task"], record["prompt"], record["reference"])
        if record.get("score") is not None:
            scores[(*triple, seen[triple])] = float(record["score"])
        seen[triple] += 1
    return scores


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


def _setting_overrides(runs: list[Run]) -> dict[str, frozenset[str]]:
    """setting label -> its full overrides (`+` stripped); a Run built without them falls back to its label."""
    return {r.setting: frozenset(r.overrides or (p.lstrip("+") for p in split_overrides(r.setting))) for r in runs}


def baseline_key(runs: list[Run], baseline: str | None) -> frozenset[str] | None:
    """The overrides that make a setting a baseline: `baseline`'s own (e.g. "arm=none" or a whole label), or, when
    it is None, the first of DEFAULT_BASELINES that some setting has; None when no setting has any of those.

    Raises a UserError for a given `baseline` that no setting has: a typo must not silently drop the comparison."""
    settings = _setting_overrides(runs)
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
    overrides = _setting_overrides(runs)
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
        return f"its runs have no predictions_{split}.jsonl"
    if not base_seeds:
        return f"the baseline's runs ({base}) have no predictions_{split}.jsonl"
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


def fmt_paired(p: Paired | None) -> str:
    """`+0.120 [+0.050, +0.190]`: signed, so the direction reads at a glance."""
    return "–" if p is None else f"{p.diff:+.3f} [{p.ci_low:+.3f}, {p.ci_high:+.3f}]"


def comparison_rows(comparisons: list[Comparison], tasks: list[str]) -> list[dict[str, str | int]]:
    """The paired table's rows (COMPARISON_COLUMNS, then a column per task), cells already formatted."""
    return [
        {"setting": c.setting, "baseline": c.baseline, "seeds": len(c.seeds), "examples": c.avg.examples,
         "Δavg [95% CI]": fmt_paired(c.avg), "verdict": c.verdict, **{t: fmt_paired(c.tasks.get(t)) for t in tasks}}
        for c in comparisons
    ]


def fmt(cell) -> str:
    """A cell of the mean ± std tables (a Stat shows its mean and std)."""
    if cell is None:
        return "–"
    if isinstance(cell, Stat):
        return "–" if math.isnan(cell.mean) else f"{cell.mean:.3f} ± {cell.std:.3f}"
    if isinstance(cell, float):
        return "–" if math.isnan(cell) else f"{cell:.3f}"
    return str(cell)


def fmt_interval(cell) -> str:
    """A cell of the interval tables: a Stat shows `mean [low, high]`, `mean [–]` for a single seed."""
    if not isinstance(cell, Stat) or math.isnan(cell.mean):
        return fmt(cell)
    if cell.ci_low is None:
        return f"{cell.mean:.3f} [–]"
    return f"{cell.mean:.3f} [{cell.ci_low:.3f}, {cell.ci_high:.3f}]"


def markdown(columns: list[str], rows: list[dict], cell: Callable[[object], str] = fmt) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv(columns: list[str], rows: list[dict]) -> str:
    """A Stat cell becomes four columns, <name>_mean, _std, _ci_low and _ci_high (empty for a single seed);
    spaces in a column's name become underscores."""
    stats = {c for c in columns if any(isinstance(r.get(c), Stat) for r in rows)}
    parts = ("mean", "std", "ci_low", "ci_high")
    header = [h.replace(" ", "_") for c in columns for h in ([f"{c}_{part}" for part in parts] if c in stats else [c])]
    lines = [",".join(header)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            if c in stats:
                cells += ["" if v is None or getattr(v, part) is None else f"{getattr(v, part):.6g}" for part in parts]
            else:
                cells.append("" if v is None else str(v))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def to_json(value: object) -> object:
    """json.dumps' `default`: the report's dataclasses (Stat, Paired, Comparison) as plain objects, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
