"""Plots drawn from run directories' metrics (rundir.METRICS, read by epi.logging.read_metrics; no W&B needed)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from epi.logging import read_metrics  # noqa: E402


def _save(fig: plt.Figure, out: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def mask_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of the mask events a run logged at each refresh."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for e in read_metrics(run_dir):
        if e["split"] == "mask" and not e.get("task") and e["metric"] in ("jaccard_first", "jaccard_prev", "isolated_fraction"):
            curves.setdefault(e["metric"], []).append((e["step"], e["value"]))
    return curves


def plot_drift(runs: dict[str, Path], out: Path) -> Path | None:
    """EPI's temporal-drift evidence: Jaccard of each refreshed mask with the first and the previous one.

    A flat line at 1 means importance is static (a fixed mask would do); a falling `vs first`
    curve means the important set moves during training. Returns None if no run logged masks.
    """
    curves = {label: mask_curves(d) for label, d in runs.items()}
    curves = {label: c for label, c in curves.items() if c.get("jaccard_first")}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        for metric, style in (("jaccard_first", "-"), ("jaccard_prev", "--")):
            steps, values = zip(*c[metric])
            ax.plot(steps, values, style, marker="o", markersize=3, label=f"{label}: vs {metric.split('_')[1]}")
    ax.set(xlabel="step", ylabel="Jaccard overlap of isolated sets", ylim=(0, 1.02), title="Mask drift")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def task_mask_curves(run_dir: Path) -> tuple[dict[str, dict[str, list[tuple[int, float]]]], dict[tuple[str, str], list[tuple[int, float]]]]:
    """Exclusive isolation's per-task refresh events: {task: {metric: [(step, value)]}} and {(task, other): [(step, Jaccard)]}."""
    drift: dict[str, dict[str, list[tuple[int, float]]]] = {}
    overlap: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for e in read_metrics(run_dir):
        if e["split"] == "mask" and e.get("task") and e["metric"] in ("jaccard_first", "jaccard_prev"):
            drift.setdefault(e["task"], {}).setdefault(e["metric"], []).append((e["step"], e["value"]))
        elif e["split"] == "mask_overlap" and e.get("task") and e["task"] < e["metric"]:  # each pair once
            overlap.setdefault((e["task"], e["metric"]), []).append((e["step"], e["value"]))
    return drift, overlap


def plot_task_drift(run_dir: Path, out: Path) -> Path | None:
    """Exclusive isolation over time: each task's mask against its own first and previous one (left), and
    every pair of tasks' masks against each other (right: the task-by-task overlap matrix, one line per
    cell). Returns None if the run logged no per-task masks."""
    drift, overlap = task_mask_curves(run_dir)
    if not drift:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (task, curves) in enumerate(sorted(drift.items())):
        color = f"C{i % 10}"
        for metric, style in (("jaccard_first", "-"), ("jaccard_prev", "--")):
            if curves.get(metric):
                steps, values = zip(*curves[metric])
                left.plot(steps, values, style, color=color, marker="o", markersize=3, label=f"{task}: vs {metric.split('_')[1]}")
    left.set(xlabel="step", ylabel="Jaccard with its own earlier mask", ylim=(0, 1.02), title="Each task's mask drift")
    for (task, other), points in sorted(overlap.items()):
        steps, values = zip(*points)
        right.plot(steps, values, marker="o", markersize=3, label=f"{task} / {other}")
    right.set(xlabel="step", ylabel="Jaccard of two tasks' masks", ylim=(0, 1.02), title="Task-by-task mask overlap")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, out)


def plot_overlap(tasks: list[str], overlap: list[list[float]], out: Path) -> Path:
    """CPI-FT's core overlap heatmap: Jaccard of the tasks' core regions."""
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 1.2 * len(tasks) + 1.5))
    image = ax.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i, row in enumerate(overlap):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    ax.set_title("Core overlap (Jaccard)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, out)


def plot_scores_over_steps(curves: dict[str, dict[str, dict[int, list[float]]]], out: Path, title: str, experts: Collection[str] = ()) -> Path:
    """Score vs step, one panel per task (and `avg`), one line per setting: mean over seeds, band = min..max.

    `curves[panel][setting][step]` holds one value per seed; settings keep their order (the report's).
    The single-task `experts` are drawn dashed: a reference in their own task's panel, where the caller
    puts them (not in `avg`, which would mix one task's score into the multi-task averages).
    """
    settings = sorted(dict.fromkeys(s for by_setting in curves.values() for s in by_setting), key=lambda s: s in experts)
    styles = {s: {"color": plt.get_cmap("tab10")(i % 10), "linestyle": "--" if s in experts else "-" if i < 10 else ":"} for i, s in enumerate(settings)}
    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols + 2.5, 3 * rows), squeeze=False, sharex=True)
    for ax, (panel, by_setting) in zip(axes.flat, curves.items()):
        for setting, by_step in by_setting.items():
            steps = sorted(by_step)
            means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            ax.plot(steps, means, marker="o", markersize=3, label=setting, **styles[setting])
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], color=styles[setting]["color"], alpha=0.12)
        ax.set(title=panel, xlabel="step", ylabel="score", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", markersize=3, **styles[s]) for s in settings]
    fig.legend(handles, [f"{s} (expert)" if s in experts else s for s in settings], loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title)
    return _save(fig, out, rect=(0, 0, 1 - 1.9 / fig.get_figwidth(), 1))
