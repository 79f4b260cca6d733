"""The report's tables: the score table's rows (per-task means over seeds, average, normalised score, compute,
retention), the paired table's rows, what the plots draw, and their rendering as markdown, CSV and JSON.

Definitions (also in the README):
- score: a task's exact-match score on the reported split (rundir.eval_results of each run).
- normalised score of a setting: mean over tasks of score(setting, t) / score(expert_t, t),
  where expert_t is the single-task run (data.tasks=[t]) under the same budget, both averaged
  over seeds; a task whose expert scores 0 has no normalised score (left out, and reported).
- compute of a setting: the optimizer steps and trained tokens its runs logged (split
  `compute`, probes included), mean over seeds; none when a run lacks them (older runs).
- retention: the held-out perplexity before and after training (rundir.RETENTION), mean over seeds;
  none when a run of the setting lacks it, and for every setting when the runs' corpora differ
  (corpus_sha256): perplexities of different text do not compare.
- unscored tasks: a judged task's mean rating (1-10, over the judgements the judge could parse) and how many it could
  not parse, a perplexity-scored task's perplexity; final, mean over seeds; never part of `avg` (other scales).
- general checks: each evaluation-only task's score (eval.general.tasks, rundir.GENERAL) before and after
  training and its change, mean over seeds; none for a setting unless every seed scored it on the same split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

from epi.errors import UserError
from epi.logging import read_metrics
from epi.report.runs import COMPUTE, CPI_OVERLAP, UNSCORED, Run, by_setting
from epi.report.stats import Comparison, Paired, Stat, summarize

RETENTION = {"retention ppl before": "before", "retention ppl after": "after"}  # score-table column: side of rundir.RETENTION
COMPARISON_COLUMNS = ["setting", "baseline", "seeds", "examples", "Δavg [95% CI]", "verdict"]


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


def retention_corpora(runs: list[Run], shown: Callable[[Path], Path] = Path) -> dict[str, list[Path]]:
    """corpus_sha256 -> the runs measured on that held-out text, in the sweep's order (`shown`: how a run's path
    is written, e.g. inside the archive it was read from)."""
    corpora: dict[str, list[Path]] = {}
    for r in runs:
        if r.retention:
            corpora.setdefault(r.retention["corpus_sha256"], []).append(shown(r.path))
    return corpora


def retention_mismatch(runs: list[Run], shown: Callable[[Path], Path] = Path) -> str | None:
    """The report's line when the runs measured retention on different text (so no column is filled), else None."""
    corpora = retention_corpora(runs, shown)
    if len(corpora) < 2:
        return None
    named = "; ".join(f"{sha[:12]} in {', '.join(map(str, paths))}" for sha, paths in corpora.items())
    return f"Retention left out: the runs measured it on different held-out text (corpus_sha256 {named}); their perplexities do not compare."


def every_seed(values: list[float | None]) -> Stat | None:
    """`summarize` of a setting's per-seed values; None unless every seed has one (a mean over part of the seeds would
    misstate it, as for compute)."""
    return None if None in values else summarize(values)


def retention_stat(group: list[Run], side: str) -> Stat | None:
    """Perplexity `side` ("before" / "after") over a setting's seeds (`every_seed`)."""
    return every_seed([((r.retention or {}).get(side) or {}).get("perplexity") for r in group])


def unscored_table(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """Columns `<task> <metric>` for each task without a score and each UNSCORED metric some run reports for it, and
    rows per setting: a `Stat` over the setting's seeds, or None unless every seed reports it."""
    present = {(t, m) for r in runs for t, metrics in r.unscored.items() for m in metrics}
    pairs = [(t, m) for t in sorted({t for t, _ in present}) for m in UNSCORED if (t, m) in present]
    rows = []
    for setting, group in by_setting(runs).items():
        row: dict = {"setting": setting, "seeds": len(group)}
        for t, m in pairs:
            row[f"{t} {m}"] = every_seed([r.unscored.get(t, {}).get(m) for r in group])
        rows.append(row)
    return [f"{t} {m}" for t, m in pairs], rows


def general_score(run: Run, side: str, task: str) -> float | None:
    """A general check's score `side` ("before" / "after") in `run`; None when the run has no such check or side."""
    results = (run.general or {}).get(side) or {}
    return results.get(task, {}).get("score")


def general_table(runs: list[Run]) -> tuple[str | None, list[str], list[dict]]:
    """The general checks' split, columns and rows per setting: `<task> before`, `<task> after` and `<task> Δ` (after −
    before per seed), each over the setting's seeds (`every_seed`). No columns when no run has checks; split None
    when the runs scored them on different splits (then no row is filled: they do not compare)."""
    checked = [r.general for r in runs if r.general]
    tasks = sorted({t for g in checked for t in g["after"] if "score" in g["after"][t]})
    if not tasks:
        return None, [], []
    splits = {g["split"] for g in checked}
    split = splits.pop() if len(splits) == 1 else None
    rows = []
    for setting, group in by_setting(runs).items():
        row: dict = {"setting": setting, "seeds": len(group)}
        for t in tasks:
            before, after = ([general_score(r, side, t) for r in group] if split else [None] for side in ("before", "after"))
            changes = [None if None in (b, a) else a - b for b, a in zip(before, after)]
            row |= {f"{t} before": every_seed(before), f"{t} after": every_seed(after), f"{t} Δ": every_seed(changes)}
        rows.append(row)
    return split, [f"{t} {side}" for t in tasks for side in ("before", "after", "Δ")], rows


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
    found = [json.loads(f.read_text()) for f in (r.path / CPI_OVERLAP for r in group) if f.is_file()]
    if not found:
        return None
    tasks = found[0]["tasks"]
    if any(o["tasks"] != tasks for o in found):
        raise UserError(f"core overlaps of one setting list different tasks: {[o['tasks'] for o in found]}")
    return tasks, [[statistics.fmean(o["jaccard"][i][j] for o in found) for j in range(len(tasks))] for i in range(len(tasks))]


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
