"""Finding and reading run directories: the finished runs (`Run`) and the ones that did not finish (`Unfinished`).

A run directory holds train.py's resolved config (rundir.CONFIG) and its event log (rundir.METRICS), or is a Hydra
job of train.py that failed before training (only its rundir.HYDRA_RECORD). A run is finished on a split when it has
that split's results (rundir.eval_results). Every file name comes from epi.rundir.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from epi import rundir
from epi.rundir import is_bookkeeping
from epi.errors import UserError
from epi.logging import read_metrics

COMPUTE = {"steps": "optimizer_steps", "tokens": "trained_tokens"}  # score-table column: metric of the `compute` split
# What an unscored task reports instead of a score (epi.evaluate.summary): a judge's mean rating (1-10) and the judgements
# it could not parse, or the perplexity of its references
UNSCORED = ("rating", "judge_unparseable", "perplexity")
# train.py's own record of a failure, then Hydra's job log; train.py prints `error: ...` to
# stderr, which Hydra does not copy into the job log and the joblib launcher does not keep
ERROR_FILES = (rundir.ERROR, rundir.LOG)
NO_ERROR = "no error recorded (see the launcher's output)"
CPI_GROUPS = rundir.artifact(f"{rundir.CPI_DIR}/groups")  # CPI/multistage: the tasks of each stage
CPI_OVERLAP = rundir.artifact(f"{rundir.CPI_DIR}/overlap")  # CPI: the Jaccard overlap of the tasks' core regions


@dataclass
class Run:
    path: Path
    setting: str
    seed: int
    tasks: list[str]
    scores: dict[str, float]  # final score per task
    unscored: dict[str, dict[str, float]] = field(default_factory=dict)  # task without a score -> its UNSCORED metrics, final
    stages: list[list[str]] = field(default_factory=list)  # tasks trained in each stage
    matrix: list[dict[str, float] | None] = field(default_factory=list)  # after each stage: task -> score; None = not evaluated
    missing_stages: list[int] = field(default_factory=list)  # stages whose after-stage evaluation is not in the metrics
    losses: list[dict[str, float] | None] = field(default_factory=list)  # after each stage: task -> test loss, like `matrix`
    compute: dict[str, float] = field(default_factory=dict)  # COMPUTE column -> value; empty for runs from before it was logged
    retention: dict | None = None  # rundir.RETENTION as written (Trainer.write_retention); None when the run measured none
    general: dict | None = None  # rundir.GENERAL as written (epi.general.write_general): split, before, after; None: no checks
    overrides: list[str] = field(default_factory=list)  # the group's overrides, `+` stripped, kept whole: `shorten` relabels `setting`

    @property
    def expert_of(self) -> str | None:
        return self.tasks[0] if len(self.tasks) == 1 else None


@dataclass
class Unfinished:
    """A run directory without the split's results: its job failed, was killed, or is still running."""

    path: Path
    overrides: list[str]  # the job's command-line overrides (rundir.HYDRA_OVERRIDES), in full
    error: str  # the last `error:` line it left, or NO_ERROR
    name: str  # the overrides that tell it apart within the report (`shorten` drops the shared ones)


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories under the given paths (a multirun dir, a run dir, or a mix), finished or not, in the
    sweep's order: Hydra's job numbers compare as numbers (2 before 10), so tables list the arms as swept.

    A run directory holds train.py's config and metrics, or is a Hydra job of train.py: a run that failed
    before training leaves only that job's Hydra record (eval.py's own jobs are not runs)."""
    found: set[Path] = set()
    for path in map(Path, paths):
        found |= {p.parent for p in path.rglob(rundir.CONFIG) if (p.parent / rundir.METRICS).is_file()}
        found |= {p.parent.parent for p in path.rglob(rundir.HYDRA_FILE)
                  if p.parent.name == rundir.HYDRA_RECORD and _job_name(p) == "train"}
    if not found:
        raise UserError(f"runs={[str(p) for p in paths]}: no run directories (train.py runs or their Hydra jobs) found there")
    return sorted(found, key=lambda d: [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in d.parts])


def _job_name(hydra_yaml: Path) -> str | None:
    return OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.name")


def load_runs(paths: Sequence[Path], split: str) -> tuple[list[Run], list[Unfinished]]:
    """The runs with the split's results, and the others, each in the sweep's order.

    Raises a UserError when none finished: then the split is the likelier mistake than the runs."""
    found = find_runs(paths)
    results = rundir.eval_results(split)
    done = [p for p in found if (p / results).is_file()]
    if not done:
        first_error = next((e for e in map(error_line, found) if e != NO_ERROR), NO_ERROR)
        raise UserError(
            f"runs={[str(p) for p in paths]}: none of the {len(found)} run directories has {results}: they did not "
            f"finish, or were evaluated on another split than eval.split={split} (first error: {first_error})"
        )
    return [load_run(p, split) for p in done], [unfinished(p) for p in found if p not in done]


def unfinished(path: Path) -> Unfinished:
    overrides = path / rundir.HYDRA_RECORD / rundir.HYDRA_OVERRIDES
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
    cfg = OmegaConf.load(path / rundir.CONFIG)
    result = path / rundir.eval_results(split)
    if not result.is_file():
        raise UserError(f"{path}: no {result.name}; the run did not finish (or was evaluated on another split)")
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
    # a run trained before bookkeeping overrides left the group (setting_name) still joins its setting
    overrides = [p for p in split_overrides(cfg.logger.group or "default") if not is_bookkeeping(p)]
    group = ",".join(overrides) or "default"
    retention, general = path / rundir.RETENTION, path / rundir.GENERAL
    return Run(
        path=path,
        setting=group,
        seed=int(cfg.seed),
        tasks=list(cfg.data.tasks),
        scores={t: r["score"] for t, r in final.items() if "score" in r},  # perplexity- and judge-scored tasks have none
        unscored={t: {m: r[m] for m in UNSCORED if m in r} for t, r in final.items() if "score" not in r},
        stages=stages,
        matrix=[after.get(k) for k in expected],
        missing_stages=[k for k in expected if k not in after],
        losses=[after_loss.get(k) for k in expected],
        compute=_compute(events),
        retention=json.loads(retention.read_text()) if retention.is_file() else None,
        general=json.loads(general.read_text()) if general.is_file() else None,
        overrides=[p.lstrip("+") for p in split_overrides(group)],
    )


def _compute(events: list[dict]) -> dict[str, float]:
    """The COMPUTE metrics a run logged once at its end (split `compute`, no task)."""
    metrics = {metric: column for column, metric in COMPUTE.items()}
    return {metrics[e["metric"]]: e["value"] for e in events if e["split"] == "compute" and e["metric"] in metrics}


def _stages(path: Path, cfg) -> list[list[str]]:
    """Tasks of each stage: CPI/multistage groups, else schedule.stages, else one stage."""
    group_file = path / CPI_GROUPS
    if group_file.is_file():
        return json.loads(group_file.read_text())["groups"]
    if cfg.schedule.stages:
        return [list(s.tasks) for s in cfg.schedule.stages]
    return [list(cfg.data.tasks)]


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


Key = tuple[str, str, str, int]  # a test example: (task, prompt, reference, occurrence of that triple in the file)


def load_predictions(run_dir: Path, split: str, after_stage: int | None = None) -> dict[Key, float] | None:
    """Each scored example's score from the split's predictions (rundir.predictions: the final ones, or with
    `after_stage=k` those at the end of stage k); None when the run has none.

    The occurrence count in the key keeps a test set's duplicate examples apart instead of letting one
    overwrite the other. Perplexity-scored tasks (score null) generate nothing to compare and are left out."""
    file = run_dir / rundir.predictions(split, after_stage)
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
