"""Tables over sets of runs, read from their run directories (no W&B needed).

A *setting* is a run's W&B group: its command-line overrides without the seed, so the seeds
of one setting are averaged. Definitions (also in the README):
- score: a task's exact-match score on the reported split (eval_<split>.json of each run).
- normalised score of a setting: mean over tasks of score(setting, t) / score(expert_t, t),
  where expert_t is the single-task run (data.tasks=[t]) under the same budget, both averaged
  over seeds; a task whose expert scores 0 has no normalised score (left out, and reported).
- accuracy matrix of a sequential run: A[k][t] = score of task t after stage k.
- BWT (backward transfer) = mean over tasks trained before the last stage of
  A[last][t] - A[s(t)][t], s(t) the stage that trained t; forgetting = mean of
  max_k<last A[k][t] - A[last][t] over the same tasks (>= 0; BWT < 0 means forgetting).
- delta_A / delta_B (the papers' "train A then B" table): the change over the last stage of
  the scores of the first stage's tasks (A: forgetting when negative) and of the last
  stage's tasks (B: the gain).
A run whose metrics lack a stage's evaluation keeps that row as a gap (None) and is left out
of the transfer numbers, with its name and the missing stages in the report.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from epi.errors import UserError
from epi.logging import read_metrics

TRANSFER = ("delta_A", "delta_B", "bwt", "forgetting")


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

    @property
    def expert_of(self) -> str | None:
        return self.tasks[0] if len(self.tasks) == 1 else None


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories under the given paths (a multirun dir, a run dir, or a mix), in the sweep's
    order: Hydra's job numbers compare as numbers (2 before 10), so tables list the arms as swept."""
    found = {p.parent for path in paths for p in Path(path).rglob("config.yaml") if (p.parent / "metrics.jsonl").is_file()}
    found = sorted(found, key=lambda d: [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in d.parts])
    if not found:
        raise UserError(f"runs={[str(p) for p in paths]}: no run directories (with config.yaml and metrics.jsonl) found there")
    return found


def load_run(path: Path, split: str) -> Run:
    cfg = OmegaConf.load(path / "config.yaml")
    result = path / f"eval_{split}.json"
    if not result.is_file():
        raise UserError(f"{path}: no eval_{split}.json; the run did not finish (or was evaluated on another split)")
    final = json.loads(result.read_text())
    events = read_metrics(path)
    after: dict[int, dict[str, float]] = {}
    for e in events:
        prefix = f"{split}/after_stage"
        if e["split"].startswith(prefix) and e["metric"] == "score" and e["task"]:
            after.setdefault(int(e["split"][len(prefix):]), {})[e["task"]] = e["value"]
    stages = _stages(path, cfg)
    # row k is stage k's: a stage without its evaluation stays a marked gap, never closed up by the next one
    expected = range(len(stages)) if len(stages) > 1 else sorted(after)
    return Run(
        path=path,
        setting=cfg.logger.group or "default",
        seed=int(cfg.seed),
        tasks=list(cfg.data.tasks),
        scores={t: r["score"] for t, r in final.items() if "score" in r},  # perplexity-scored tasks have none
        stages=stages,
        matrix=[after.get(k) for k in expected],
        missing_stages=[k for k in expected if k not in after],
    )


def _stages(path: Path, cfg) -> list[list[str]]:
    """Tasks of each stage: CPI/multistage groups, else schedule.stages, else one stage."""
    group_file = path / "cpi" / "groups.json"
    if group_file.is_file():
        return json.loads(group_file.read_text())["groups"]
    if cfg.schedule.stages:
        return [list(s.tasks) for s in cfg.schedule.stages]
    return [list(cfg.data.tasks)]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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


def shorten(runs: list[Run]) -> None:
    """Drop the overrides every run shares (e.g. experiment=..., model size) from the setting labels."""
    parts = {r.setting: split_overrides(r.setting) for r in runs}
    common = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    for r in runs:
        r.setting = ",".join(p.lstrip("+") for p in parts[r.setting] if p not in common) or "default"


def by_setting(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.setting, []).append(run)
    return out


def score_table(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """Rows per setting: per-task mean/std over seeds, average, normalised score vs the experts."""
    settings = by_setting(runs)
    tasks = sorted({t for r in runs if r.expert_of is None for t in r.tasks})
    experts = {r.expert_of: [] for r in runs if r.expert_of}
    for r in runs:
        if r.expert_of:
            experts[r.expert_of].append(r.scores[r.expert_of])
    expert_mean = {t: statistics.fmean(v) for t, v in experts.items()}
    rows = []
    for setting, group in settings.items():
        row: dict = {"setting": setting, "seeds": len(group)}
        for t in tasks:
            values = [r.scores[t] for r in group if t in r.scores]
            row[t] = mean_std(values) if values else None
        per_seed_avg = [statistics.fmean(r.scores[t] for t in tasks if t in r.scores) for r in group if any(t in r.scores for t in tasks)]
        row["avg"] = mean_std(per_seed_avg) if per_seed_avg else None
        ratios = [row[t][0] / expert_mean[t] for t in tasks if row.get(t) and expert_mean.get(t)]
        row["normalised"] = statistics.fmean(ratios) if ratios else None
        rows.append(row)
    return tasks, rows


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
    return {"bwt": bwt, "forgetting": forgetting, "delta_A": delta_a, "delta_B": delta_b}


def fmt(cell) -> str:
    if cell is None:
        return "–"
    if isinstance(cell, tuple):
        return "–" if math.isnan(cell[0]) else f"{cell[0]:.3f} ± {cell[1]:.3f}"
    if isinstance(cell, float):
        return "–" if math.isnan(cell) else f"{cell:.3f}"
    return str(cell)


def markdown(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv(columns: list[str], rows: list[dict]) -> str:
    """Mean ± std cells become two columns, <name>_mean and <name>_std."""
    paired = {c for c in columns if any(isinstance(r.get(c), tuple) for r in rows)}
    header = [h for c in columns for h in ([f"{c}_mean", f"{c}_std"] if c in paired else [c])]
    lines = [",".join(header)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            if c in paired:
                cells += [f"{v[0]:.6g}", f"{v[1]:.6g}"] if v is not None else ["", ""]
            else:
                cells.append("" if v is None else str(v))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"
