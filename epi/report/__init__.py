"""Tables over sets of runs, read from their run directories or archives of them (no W&B needed).

A *setting* is a run's W&B group: its command-line overrides without the seed (and without the
bookkeeping keys `logger.*` and `threads`, which change no number), so the seeds of one setting are averaged.
A run whose metrics lack a stage's evaluation keeps that row as a gap (None) and is left out
of the transfer numbers, with its name and the missing stages in the report. A run without
the split's results (failed, killed, or still running) is listed with its overrides and the
error line it left, so that a sweep's failures are not silently missing from the tables.

The package, by job (the definitions of each number are in the module that computes it):
- runs: finding and reading run directories (Run, Unfinished, load_runs, load_predictions);
- stats: intervals over seeds, backward transfer and forgetting, the paired bootstrap against a baseline;
- tables: the score and paired tables' rows, what the plots draw, markdown / CSV / JSON rendering;
- document: the whole report in-process (`write_report`: report.md, report.json, CSVs, plots);
- jobs: eval.py's two jobs, `evaluate_model` (one run or model) and `report_runs` (runs=...); imported on
  demand (it loads the model code), not from here.
Every name below stays importable as `epi.report.<name>`.
"""

from epi.report.document import Report, write_report
from epi.report.runs import (
    COMPUTE, CPI_GROUPS, CPI_OVERLAP, ERROR_FILES, NO_ERROR, Key, Run, Unfinished, by_setting, error_line, find_runs,
    load_predictions, load_run, load_runs, shorten, split_overrides, unfinished,
)
from epi.report.stats import (
    BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, DEFAULT_BASELINES, T_975, TRANSFER, Z_975, Comparison, Paired, Stat, baseline_key,
    baselines_of, compare_to_baseline, example_differences, paired_bootstrap, resampled_means, summarize, t_quantile_975,
    transfer, verdict,
)
from epi.report.tables import (
    COMPARISON_COLUMNS, RETENTION, comparison_rows, core_overlap, csv, expert_means, fmt, fmt_interval, fmt_paired,
    left_out_of_normalised, markdown, multitask_tasks, retention_columns, retention_corpora, retention_mismatch,
    retention_stat, score_curves, score_table, to_json,
)

__all__ = [
    "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "COMPARISON_COLUMNS", "COMPUTE", "CPI_GROUPS", "CPI_OVERLAP", "DEFAULT_BASELINES",
    "ERROR_FILES", "NO_ERROR", "RETENTION", "T_975", "TRANSFER", "Z_975", "Comparison", "Key", "Paired", "Report", "Run", "Stat",
    "Unfinished", "baseline_key", "baselines_of", "by_setting", "compare_to_baseline", "comparison_rows", "core_overlap", "csv",
    "error_line", "example_differences", "expert_means", "find_runs", "fmt", "fmt_interval", "fmt_paired",
    "left_out_of_normalised", "load_predictions", "load_run", "load_runs", "markdown", "multitask_tasks", "paired_bootstrap",
    "resampled_means", "retention_columns", "retention_corpora", "retention_mismatch", "retention_stat", "score_curves",
    "score_table", "shorten", "split_overrides", "summarize", "t_quantile_975", "to_json", "transfer", "unfinished", "verdict",
    "write_report",
]
