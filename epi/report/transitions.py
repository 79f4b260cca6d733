"""Per-example forgetting: which test examples of an earlier stage's tasks went right -> wrong ("forgotten") or
wrong -> right ("learned") between the end of the stage that trained them and the end of the run.

A difference of two averages hides churn: a task can keep its score while forgetting some examples and learning
as many others. Counting the transitions per example (the per-sample transition count of arXiv 2510.17776)
resolves it, and since every arm of a sweep answers the same test examples, an arm's transitions pair with its
baseline's example by example, so the paired bootstrap of the score comparison applies unchanged.

An example is right when its score is 1: every generative scorer here scores 0 or 1 (`epi.data.scorers`); tasks
scored by perplexity have no per-example score and take no part. A task trained in several stages counts from
the last stage that trained it before the final one (as `stats.transfer` does). The predictions after each stage
are `rundir.predictions(split, after_stage=k)`, written by the trainer at each stage's end; the end of the run is
the final `predictions_<split>.jsonl` (the same weights as the last stage's).
"""

from __future__ import annotations

from dataclasses import dataclass

from epi import rundir
from epi.report.runs import Key, Run, by_setting, load_predictions
from epi.report.stats import (
    BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Paired, setting_overrides, baseline_key, baselines_of, example_differences,
    paired_bootstrap, summarize,
)

TRANSITIONS = ("forgotten", "learned")
COLUMNS = ["setting", "seeds", "examples", "right after their stage", "forgotten", "forgotten share", "learned", "learned share"]
PAIRED_COLUMNS = ["setting", "baseline", "seeds", "examples", "Δforgotten share [95% CI]", "Δlearned share [95% CI]"]


@dataclass(frozen=True)
class Transitions:
    """One run's transitions: per kind, an indicator per example (1.0: it made that transition)."""

    forgotten: dict[Key, float]
    learned: dict[Key, float]
    right_before: int  # examples right at the end of their own stage: the most that can be forgotten

    @property
    def examples(self) -> int:
        return len(self.forgotten)


def run_transitions(run: Run, split: str) -> Transitions | str:
    """The transitions of one sequential run's (two stages or more) earlier-trained tasks, or why it has none."""
    last = len(run.stages) - 1
    final = load_predictions(run.path, split)
    if final is None:
        return f"no {rundir.predictions(split)}"
    trained_at = {t: k for k, stage in enumerate(run.stages) for t in stage}
    earlier = {t: k for t, k in trained_at.items() if k < last}
    forgotten: dict[Key, float] = {}
    learned: dict[Key, float] = {}
    right_before = 0
    for k in sorted(set(earlier.values())):
        before = load_predictions(run.path, split, after_stage=k)
        if before is None:
            return f"no {rundir.predictions(split, after_stage=k)} (a run from before per-stage predictions were kept)"
        for key, score in before.items():
            if earlier.get(key[0]) == k and key in final:
                was_right, is_right = score >= 1.0, final[key] >= 1.0
                forgotten[key] = float(was_right and not is_right)
                learned[key] = float(is_right and not was_right)
                right_before += was_right
    if not forgotten:
        return "no scored test example of an earlier stage's tasks"
    return Transitions(forgotten, learned, right_before)


@dataclass(frozen=True)
class PairedTransitions:
    """An arm's transitions against its baseline's, on the examples both answered: Δ = arm − baseline share."""

    setting: str
    baseline: str
    seeds: list[int]
    forgotten: Paired
    learned: Paired


def by_example(runs: list[Run], split: str, baseline: str | None, resamples: int = BOOTSTRAP_RESAMPLES,
               seed: int = BOOTSTRAP_SEED) -> tuple[list[dict[str, object]], list[PairedTransitions], dict[str, str]]:
    """(per setting: seeds, examples and the counts and shares of each transition over seeds; each arm against its
    baseline setting, as `stats.compare_to_baseline` pairs them; why runs were left out -> which)."""
    found = {r.path: run_transitions(r, split) for r in runs if len(r.stages) > 1}
    seeds_left_out: dict[str, dict[str, list[int]]] = {}  # why -> setting -> seeds
    for r in runs:
        if isinstance(why := found.get(r.path), str):
            seeds_left_out.setdefault(why, {}).setdefault(r.setting, []).append(r.seed)
    left_out = {why: ", ".join(f"{setting} (seeds {', '.join(map(str, sorted(seeds)))})" for setting, seeds in settings.items())
                for why, settings in seeds_left_out.items()}
    rows: list[dict[str, object]] = []
    per_setting: dict[str, dict[int, Transitions]] = {}
    for setting, group in by_setting(runs).items():
        done = {r.seed: t for r in group if isinstance(t := found.get(r.path), Transitions)}
        if not done:
            continue
        per_setting[setting] = done
        row: dict[str, object] = {"setting": setting, "seeds": len(done), "examples": summarize([t.examples for t in done.values()]),
                                  "right after their stage": summarize([t.right_before for t in done.values()])}
        for kind in TRANSITIONS:
            counts = [sum(getattr(t, kind).values()) for t in done.values()]
            row[kind] = summarize(counts)
            row[f"{kind} share"] = summarize([c / t.examples for c, t in zip(counts, done.values())])
        rows.append(row)
    return rows, _paired(runs, per_setting, baseline, resamples, seed, left_out), left_out


def _paired(runs: list[Run], per_setting: dict[str, dict[int, Transitions]], baseline: str | None, resamples: int, seed: int,
            left_out: dict[str, str]) -> list[PairedTransitions]:
    key = baseline_key(runs, baseline)
    if key is None:
        return []
    overrides = {s: o for s, o in setting_overrides(runs).items() if s in per_setting}
    out = []
    for setting, base in baselines_of(overrides, key).items():
        if base is None:
            continue
        seeds = sorted(per_setting[setting].keys() & per_setting[base].keys())
        if not seeds:
            left_out[f"no seed in common with the baseline ({base})"] = setting
            continue
        paired = {}
        for kind in TRANSITIONS:
            diffs = example_differences([getattr(per_setting[setting][s], kind) for s in seeds],
                                        [getattr(per_setting[base][s], kind) for s in seeds])
            paired[kind] = paired_bootstrap(diffs, resamples, seed)[0] if diffs else None
        if paired["forgotten"] is not None:
            out.append(PairedTransitions(setting, base, seeds, paired["forgotten"], paired["learned"]))
    return out
