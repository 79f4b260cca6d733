"""The whole report over a set of runs, built in-process: `write_report(runs, out_dir, ...)`.

Per-setting scores (mean ± std over seeds, then their 95% t intervals), normalised score, compute, retention, the
unscored tasks' ratings and perplexities, the general checks before and after, the paired comparison with the
baseline setting, transfer, the runs that did not finish, plots: markdown (REPORT_MD), JSON (REPORT_JSON), CSV
(SCORES_CSV, UNSCORED_CSV, GENERAL_CSV, TRANSFER_CSV, TRANSITIONS_CSV) and PNGs in `out_dir`. `runs` are directories
(a multirun dir, run dirs) or archives of them (epi.archive: a `.tar.xz` reads as the directory it was packed from;
its runs are named `<archive>/<member path>`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from epi import archive as archives
from epi import rundir
from epi.plots import plot_drift, plot_overlap, plot_scores_over_steps, plot_task_drift
from epi.report.runs import COMPUTE, Run, Unfinished, by_setting, load_runs, shorten
from epi.report.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, TRANSFER, compare_to_baseline, summarize, transfer
from epi.report.tables import (
    COMPARISON_COLUMNS, comparison_rows, core_overlap, csv, fmt_interval, fmt_paired, general_table, left_out_of_normalised, markdown,
    retention_columns, retention_corpora, retention_mismatch, score_curves, score_table, to_json, unscored_table,
)
from epi.report.transitions import COLUMNS as TRANSITION_COLUMNS
from epi.report.transitions import PAIRED_COLUMNS as PAIRED_TRANSITION_COLUMNS
from epi.report.transitions import PairedTransitions, by_example

REPORT_MD, REPORT_JSON, SCORES_CSV, TRANSFER_CSV = "report.md", "report.json", "scores.csv", "transfer.csv"
TRANSITIONS_CSV, GENERAL_CSV, UNSCORED_CSV = "transitions.csv", "general.csv", "unscored.csv"


@dataclass
class Report:
    """What `write_report` wrote: the markdown (REPORT_MD without its final newline), the JSON (REPORT_JSON), the
    score table's columns and rows (for a logger), the plots drawn, and what `archive=` copied."""

    markdown: str
    data: dict
    columns: list[str]
    rows: list[dict]
    runs: list[Run]
    unfinished: list[Unfinished]
    plots: list[Path] = field(default_factory=list)
    drift: bool = False  # a mask drift plot was drawn (some run is an EPI run)
    archived: tuple[int, int] | None = None  # (files, bytes) copied by `archive=`


def write_report(runs: Path | str | Sequence[Path | str], out_dir: Path, *, split: str = "test", baseline: str | None = None,
                 archive: Path | None = None) -> Report:
    """Tabulates the runs under `runs` into `out_dir` (created); with `archive`, also copies their evidence there
    (epi.archive.archive_runs: a new directory or `.tar.xz`/`.tar.gz`), refused before anything is written when
    it exists."""
    paths = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(p) for p in runs]
    if archive is not None:
        archives.check_destination(Path(archive))  # before any table is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with archives.opened(paths) as sources:
        report = _write(sources.paths, sources.shown, out_dir, split, baseline)
        if archive is not None:
            report.archived = archives.archive_runs([r.path for r in report.runs] + [u.path for u in report.unfinished], Path(archive))
    return report


def _write(paths: list[Path], shown: Callable[[Path], Path], out_dir: Path, split: str, baseline: str | None) -> Report:
    runs, unfinished = load_runs(paths, split)
    shorten(runs, unfinished)
    tasks, rows = score_table(runs)
    retention = retention_columns(runs)
    columns = ["setting", "seeds", *tasks, "avg", "normalised", *COMPUTE, *retention]
    scores = f"## Scores ({split} split, mean ± std over seeds)\n\n" + markdown(columns, rows)
    if left_out := left_out_of_normalised(runs):
        scores += "\n\nLeft out of the normalised score: " + ", ".join(f"{t} ({why})" for t, why in left_out.items()) + "."
    if mismatch := retention_mismatch(runs, shown):
        scores += f"\n\n{mismatch}"
    scores += ("\n\n95% intervals over seeds (Student t: mean ± t(0.975, n−1)·s/√n; [–]: a single seed):\n\n"
               + markdown(["setting", "seeds", *tasks, "avg", *retention], rows, fmt_interval))
    sections = [scores]
    (out_dir / SCORES_CSV).write_text(csv(columns, rows))

    unscored_columns, unscored_rows = unscored_table(runs)
    if unscored_columns:
        sections.append(
            f"## Tasks without a score ({split} split, mean ± std over seeds)\n\nA judged task's mean rating (1–10, over the "
            "judgements the judge could parse) and the count it could not parse; a perplexity-scored task's perplexity. "
            "Neither is part of `avg`.\n\n" + _with_intervals(["setting", "seeds", *unscored_columns], unscored_rows))
        (out_dir / UNSCORED_CSV).write_text(csv(["setting", "seeds", *unscored_columns], unscored_rows))
    general_split, general_columns, general_rows = general_table(runs)
    if general_columns:
        sections.append(_general_section(general_split, general_columns, general_rows))
        (out_dir / GENERAL_CSV).write_text(csv(["setting", "seeds", *general_columns], general_rows))

    baselines, comparisons, not_compared = compare_to_baseline(runs, split, baseline)
    if comparisons or not_compared:  # a baseline with no other setting: nothing to pair
        sections.append(_paired_section(split, baselines, comparisons, not_compared))

    transfers = []
    for setting, group in by_setting(runs).items():
        values = [t for t in (transfer(r) for r in group) if t]
        if values:
            transfers.append({"setting": setting, "seeds": len(values), **{k: summarize([v[k] for v in values]) for k in TRANSFER}})
    if transfers:
        sections.append(
            "## Sequential training: backward transfer and forgetting\n\n" + _with_intervals(["setting", "seeds", *TRANSFER], transfers))
        (out_dir / TRANSFER_CSV).write_text(csv(["setting", "seeds", *TRANSFER], transfers))
    per_example, paired_transitions, transitions_left_out = by_example(runs, split, baseline)
    if per_example or transitions_left_out:
        sections.append(_transitions_section(per_example, paired_transitions, transitions_left_out))
    if per_example:
        (out_dir / TRANSITIONS_CSV).write_text(csv(TRANSITION_COLUMNS, per_example))
    if gaps := [r for r in runs if r.missing_stages]:
        sections.append(
            "## Runs left out of the transfer numbers\n\nTheir metrics lack the evaluation after these stages:\n\n"
            + "\n".join(f"- {shown(r.path)} ({r.setting}, seed {r.seed}): stage(s) {r.missing_stages}" for r in gaps)
        )
    if unfinished:
        sections.append(
            f"## Runs that did not finish\n\nNo {rundir.eval_results(split)} (failed, killed, or still running); not in the tables above:\n\n"
            + "\n".join(f"- {shown(u.path)} ({u.name}): {u.error}" for u in unfinished)
        )
    drift = _plots(runs, split, out_dir)

    text = "\n\n".join(sections)
    data = {
        "split": split,
        "scores": rows,  # a mean over seeds is {mean, std, n, ci_low, ci_high}
        "left_out_of_normalised": left_out,
        "retention_corpora": retention_corpora(runs, shown),  # corpus_sha256 -> runs; more than one: no retention columns
        "unscored": {"columns": unscored_columns, "rows": unscored_rows},
        "general": {"split": general_split, "columns": general_columns, "rows": general_rows},
        "baseline": baselines,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "stratified_by": "task", "interval": "95% percentile"},
        "vs_baseline": comparisons,
        "not_compared": not_compared,
        "transfer": transfers,
        "per_example_forgetting": {"settings": per_example, "vs_baseline": paired_transitions, "left_out": transitions_left_out},
        "runs": [{"path": str(shown(r.path)), "setting": r.setting, "seed": r.seed, "scores": r.scores, "unscored": r.unscored, "compute": r.compute,
                  "retention": r.retention, "general": r.general, "accuracy_matrix": r.matrix, "missing_stages": r.missing_stages, "stages": r.stages} for r in runs],
        "unfinished": [{"path": str(shown(u.path)), "name": u.name, "overrides": u.overrides, "error": u.error} for u in unfinished],
    }
    (out_dir / REPORT_MD).write_text(text + "\n")
    (out_dir / REPORT_JSON).write_text(json.dumps(data, indent=2, default=to_json) + "\n")
    return Report(text, json.loads(json.dumps(data, default=to_json)), columns, rows, runs, unfinished,
                  list(out_dir.glob("*.png")), drift)


def _with_intervals(columns: list[str], rows: list[dict]) -> str:
    """A table of means ± std over seeds, then the same rows as 95% intervals (the score table's second table)."""
    return markdown(columns, rows) + "\n\n95% intervals over seeds (as above):\n\n" + markdown(columns, rows, fmt_interval)


def _general_section(split: str | None, columns: list[str], rows: list[dict]) -> str:
    head = "## General ability (eval.general.tasks: evaluation-only checks, before and after training)\n\n"
    if split is None:
        return head + "Left out: the runs scored their general checks on different splits; their scores do not compare."
    return head + f"The {split} split, mean ± std over seeds; Δ is after − before within each run:\n\n" + _with_intervals(
        ["setting", "seeds", *columns], rows)


def _paired_section(split: str, baselines: list[str], comparisons: list, not_compared: dict[str, str]) -> str:
    compared_tasks = sorted({t for c in comparisons for t in c.tasks})
    paired = (
        f"## Against the baseline ({', '.join(baselines)}): paired bootstrap over {split} examples\n\n"
        f"Δ = arm − baseline score per example matched by (task, prompt, reference), each side averaged over the seeds "
        f"both have; 95% percentile interval of {BOOTSTRAP_RESAMPLES} bootstrap resamples of the examples, "
        f"stratified by task (numpy seed {BOOTSTRAP_SEED}); Δavg is the unweighted mean over tasks. A setting "
        "beats (trails) the baseline only when the Δavg interval lies above (below) 0."
    )
    if comparisons:
        paired += "\n\n" + markdown([*COMPARISON_COLUMNS, *compared_tasks], comparison_rows(comparisons, compared_tasks))
    if sequential := [c.setting for c in comparisons if c.sequential]:
        paired += (f"\n\nCompared on their final predictions only, as they (or their baseline) trained in stages: {', '.join(sequential)}. "
                   "ΔA, ΔB, BWT and forgetting are differences of per-stage averages and have no paired test; the per-example "
                   "transitions (forgotten, learned) below have one.")
    if not_compared:
        paired += "\n\nNot compared: " + "; ".join(f"{s} ({why})" for s, why in not_compared.items()) + "."
    return paired


def _transitions_section(rows: list[dict], paired: list[PairedTransitions], left_out: dict[str, str]) -> str:
    text = (
        "## Sequential training: per-example forgetting\n\n"
        "Each test example of a task trained before the last stage, at the end of the stage that trained it and at the end "
        "of the run: right (score 1) then wrong is forgotten, wrong then right is learned (the per-sample transition count "
        "of arXiv 2510.17776); counts and their share of those examples, mean ± std over seeds."
    )
    if rows:
        text += "\n\n" + _with_intervals(TRANSITION_COLUMNS, rows)
    if paired:
        text += (
            "\n\nAgainst the baseline, example by example: Δ = arm − baseline indicator per example matched by (task, prompt, "
            f"reference), each side averaged over the seeds both have; 95% percentile interval of {BOOTSTRAP_RESAMPLES} bootstrap "
            "resamples stratified by task, Δ the unweighted mean over tasks. Below 0: the arm forgot (learned) fewer examples.\n\n"
            + markdown(PAIRED_TRANSITION_COLUMNS, [
                {"setting": p.setting, "baseline": p.baseline, "seeds": len(p.seeds), "examples": p.forgotten.examples,
                 "Δforgotten share [95% CI]": fmt_paired(p.forgotten), "Δlearned share [95% CI]": fmt_paired(p.learned)}
                for p in paired])
        )
    if left_out:
        text += "\n\nLeft out: " + "; ".join(f"{which}: {why}" for why, which in left_out.items()) + "."
    return text


def _plots(runs: list[Run], split: str, out_dir: Path) -> bool:
    """Scores over steps, mask drift, each setting's per-task drift and CPI core overlap; True when drift was drawn."""
    if curves := score_curves(runs, split):
        experts = {r.setting for r in runs if r.expert_of}
        plot_scores_over_steps(curves, out_dir / "scores_over_steps.png", f"{split} score over steps (mean over seeds, band: min..max)", experts)
    drift = plot_drift({f"{r.setting} seed={r.seed}": r.path for r in runs}, out_dir / "drift.png")
    for setting, group in by_setting(runs).items():
        first = min(group, key=lambda r: r.seed)  # one run per setting: the per-task curves do not average over seeds
        plot_task_drift(first.path, out_dir / f"task_drift_{_file_part(setting)}.png")
        if overlap := core_overlap(group):
            plot_overlap(*overlap, out_dir / f"overlap_{_file_part(setting)}.png")
    return drift is not None


FILE_PART_MAX = 120  # bytes of a setting in a plot's file name: file systems stop at 255, and paths in overrides are long


def _file_part(setting: str) -> str:
    """A setting as part of a file name: other characters become `_`; a long one is cut and keeps a hash of the whole,
    so two settings that share their first 120 characters still get two files."""
    part = re.sub(r"[^A-Za-z0-9_.=-]+", "_", setting)
    if len(part) <= FILE_PART_MAX:
        return part
    return f"{part[:FILE_PART_MAX]}_{hashlib.sha256(setting.encode()).hexdigest()[:10]}"
