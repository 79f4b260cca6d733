"""Evaluate models, or tabulate sets of runs.

    python eval.py run_dir=<dir>          # a train.py run's model on the run's task mixture
    python eval.py model_dir=<HF dir>     # any Hugging Face model on the `data` mixture
    python eval.py runs=<dir or [dirs]>   # tables and plots over finished runs (a multirun dir, say)
    python eval.py runs=<dir> archive=<new dir>   # ... and a copy of the runs' evidence, small enough to commit
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from epi import archive, report
from epi.cli import exit_on_user_error, write_results
from epi.data.load import encode_tasks, load_tasks
from epi.data.local import expand_root
from epi.errors import UserError
from epi.evaluate import evaluate, generation_limits
from epi.logging import RunLogger
from epi.models import build_model
from epi.plots import plot_drift, plot_overlap, plot_scores_over_steps, plot_task_drift
from epi.distributed import pick_device


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    given = [k for k in ("run_dir", "model_dir", "runs") if cfg[k] is not None]
    if len(given) != 1:
        raise UserError("give exactly one of run_dir=<train.py run>, model_dir=<Hugging Face model dir>, runs=<dir or [dirs]>")
    if cfg.archive is not None:
        if cfg.runs is None:
            raise UserError("archive=<dir> copies the evidence of runs=<dir or [dirs]>; give runs= too")
        archive.check_destination(Path(cfg.archive))  # before any table is written
    if cfg.runs is not None:
        tabulate(cfg, out_dir)
    else:
        evaluate_model(cfg, out_dir)
    print(f"written to {out_dir}")


def evaluate_model(cfg: DictConfig, out_dir: Path) -> None:
    data, model_dir, run_dir = cfg.data, cfg.model_dir, cfg.run_dir
    if model_dir is not None and (Path(model_dir).parent / "config.yaml").is_file():
        run_dir = str(Path(model_dir).parent)  # a run's model/: scored on the run's own tasks, not the data defaults
        print(f"model_dir={model_dir!r} is a run's model: evaluating on that run's data config ({run_dir}/config.yaml)")
    if run_dir is not None:
        run_cfg = Path(run_dir) / "config.yaml"
        if not (Path(run_dir) / "model").is_dir() or not run_cfg.is_file():
            raise UserError(f"run_dir={run_dir!r} has no model/ and config.yaml; is it a finished train.py run directory?")
        # over the `data` defaults: a run from before a data key existed gets that key's default
        defaults = OmegaConf.create(OmegaConf.to_container(cfg.data))  # a plain copy: the run may add keys (sources)
        data, model_dir = OmegaConf.merge(defaults, OmegaConf.load(run_cfg).data), str(Path(run_dir) / "model")
    data = expand_root(data)  # data=local: one task per folder under data.root
    cfg.model.name_or_path = model_dir  # composed from conf/model/hf.yaml (eval.yaml's defaults)
    model, tok = build_model(cfg.model)
    model.to(pick_device(cfg.device))
    e = cfg.eval
    encoded = encode_tasks(tok, load_tasks(data), data)
    tasks = {name: enc.task for name, enc in encoded.items()}
    limits = generation_limits({name: enc.longest_reply for name, enc in encoded.items()}, e.max_new_tokens, e.fit_generation)
    predictions: list[dict] = []
    results = evaluate(
        model, tok, tasks, split=e.split, n_examples=e.n_examples, batch_size=e.batch_size,
        max_new_tokens=limits, max_len=data.max_len, truncate=data.truncate, predictions=predictions,
    )
    scorers = {name: task.scorer for name, task in tasks.items()}
    print(write_results(out_dir, e.split, results, scorers, f"{model_dir} ({e.split} split)", predictions))
    if run_dir is not None and plot_drift({Path(run_dir).name: Path(run_dir)}, out_dir / "drift.png"):
        print(f"mask drift plot: {out_dir / 'drift.png'}")
    if run_dir is not None and plot_task_drift(Path(run_dir), out_dir / "task_drift.png"):
        print(f"per-task mask drift and overlap (exclusive isolation): {out_dir / 'task_drift.png'}")


def tabulate(cfg: DictConfig, out_dir: Path) -> None:
    """Per-setting scores (mean ± std over seeds, then their 95% t intervals), normalised score, compute,
    retention, the paired comparison with the baseline setting, transfer, the runs that did not finish,
    plots: markdown, CSV, JSON."""
    paths = [Path(p) for p in (cfg.runs if OmegaConf.is_list(cfg.runs) else [cfg.runs])]
    split = cfg.eval.split
    runs, unfinished = report.load_runs(paths, split)
    report.shorten(runs, unfinished)
    tasks, rows = report.score_table(runs)
    retention = report.retention_columns(runs)
    columns = ["setting", "seeds", *tasks, "avg", "normalised", *report.COMPUTE, *retention]
    scores = f"## Scores ({split} split, mean ± std over seeds)\n\n" + report.markdown(columns, rows)
    if left_out := report.left_out_of_normalised(runs):
        scores += "\n\nLeft out of the normalised score: " + ", ".join(f"{t} ({why})" for t, why in left_out.items()) + "."
    if mismatch := report.retention_mismatch(runs):
        scores += f"\n\n{mismatch}"
    scores += ("\n\n95% intervals over seeds (Student t: mean ± t(0.975, n−1)·s/√n; [–]: a single seed):\n\n"
               + report.markdown(["setting", "seeds", *tasks, "avg", *retention], rows, report.fmt_interval))
    sections = [scores]
    (out_dir / "scores.csv").write_text(report.csv(columns, rows))

    baselines, comparisons, not_compared = report.compare_to_baseline(runs, split, cfg.baseline)
    if comparisons or not_compared:  # a baseline with no other setting: nothing to pair
        compared_tasks = sorted({t for c in comparisons for t in c.tasks})
        paired = (
            f"## Against the baseline ({', '.join(baselines)}): paired bootstrap over {split} examples\n\n"
            f"Δ = arm − baseline score per example matched by (task, prompt, reference), each side averaged over the seeds "
            f"both have; 95% percentile interval of {report.BOOTSTRAP_RESAMPLES} bootstrap resamples of the examples, "
            f"stratified by task (numpy seed {report.BOOTSTRAP_SEED}); Δavg is the unweighted mean over tasks. A setting "
            "beats (trails) the baseline only when the Δavg interval lies above (below) 0."
        )
        if comparisons:
            paired += "\n\n" + report.markdown([*report.COMPARISON_COLUMNS, *compared_tasks], report.comparison_rows(comparisons, compared_tasks))
        if sequential := [c.setting for c in comparisons if c.sequential]:
            paired += (f"\n\nCompared on their final predictions only, as they (or their baseline) trained in stages: {', '.join(sequential)}. "
                       "The evaluations after each stage are per task in metrics.jsonl, not per example: ΔA, ΔB, BWT and forgetting have no paired test.")
        if not_compared:
            paired += "\n\nNot compared: " + "; ".join(f"{s} ({why})" for s, why in not_compared.items()) + "."
        sections.append(paired)

    transfers = []
    for setting, group in report.by_setting(runs).items():
        values = [t for t in (report.transfer(r) for r in group) if t]
        if values:
            transfers.append({"setting": setting, "seeds": len(values), **{k: report.summarize([v[k] for v in values]) for k in report.TRANSFER}})
    if transfers:
        sections.append(
            "## Sequential training: backward transfer and forgetting\n\n" + report.markdown(["setting", "seeds", *report.TRANSFER], transfers)
            + "\n\n95% intervals over seeds (as above):\n\n" + report.markdown(["setting", "seeds", *report.TRANSFER], transfers, report.fmt_interval)
        )
        (out_dir / "transfer.csv").write_text(report.csv(["setting", "seeds", *report.TRANSFER], transfers))
    if gaps := [r for r in runs if r.missing_stages]:
        sections.append(
            "## Runs left out of the transfer numbers\n\nTheir metrics lack the evaluation after these stages:\n\n"
            + "\n".join(f"- {r.path} ({r.setting}, seed {r.seed}): stage(s) {r.missing_stages}" for r in gaps)
        )
    if unfinished:
        sections.append(
            f"## Runs that did not finish\n\nNo eval_{split}.json (failed, killed, or still running); not in the tables above:\n\n"
            + "\n".join(f"- {u.path} ({u.name}): {u.error}" for u in unfinished)
        )

    if curves := report.score_curves(runs, split):
        experts = {r.setting for r in runs if r.expert_of}
        plot_scores_over_steps(curves, out_dir / "scores_over_steps.png", f"{split} score over steps (mean over seeds, band: min..max)", experts)
    drift = plot_drift({f"{r.setting} seed={r.seed}": r.path for r in runs}, out_dir / "drift.png")
    for setting, group in report.by_setting(runs).items():
        first = min(group, key=lambda r: r.seed)  # one run per setting: the per-task curves do not average over seeds
        plot_task_drift(first.path, out_dir / f"task_drift_{re.sub(r'[^A-Za-z0-9_.=-]+', '_', setting)}.png")
        if overlap := report.core_overlap(group):
            plot_overlap(*overlap, out_dir / f"overlap_{re.sub(r'[^A-Za-z0-9_.=-]+', '_', setting)}.png")

    table = "\n\n".join(sections)
    (out_dir / "report.md").write_text(table + "\n")
    (out_dir / "report.json").write_text(
        json.dumps(
            {
                "split": split,
                "scores": rows,  # a mean over seeds is {mean, std, n, ci_low, ci_high}
                "left_out_of_normalised": left_out,
                "retention_corpora": report.retention_corpora(runs),  # corpus_sha256 -> runs; more than one: no retention columns
                "baseline": baselines,
                "bootstrap": {"resamples": report.BOOTSTRAP_RESAMPLES, "seed": report.BOOTSTRAP_SEED, "stratified_by": "task", "interval": "95% percentile"},
                "vs_baseline": comparisons,
                "not_compared": not_compared,
                "transfer": transfers,
                "runs": [{"path": str(r.path), "setting": r.setting, "seed": r.seed, "scores": r.scores, "compute": r.compute, "retention": r.retention, "accuracy_matrix": r.matrix, "missing_stages": r.missing_stages, "stages": r.stages} for r in runs],
                "unfinished": [{"path": str(u.path), "name": u.name, "overrides": u.overrides, "error": u.error} for u in unfinished],
            },
            indent=2,
            default=report.to_json,
        )
        + "\n"
    )
    print(table)
    if cfg.archive is not None:
        files, size = archive.archive_runs([r.path for r in runs] + [u.path for u in unfinished], Path(cfg.archive))
        print(f"archived the evidence of {len(runs) + len(unfinished)} runs to {cfg.archive}: {files} files, {size / 1e6:.2f} MB "
              f"(tabulate it with python eval.py runs={cfg.archive})")
    print(f"plots: {', '.join(p.name for p in out_dir.glob('*.png'))}" + ("" if drift else " (no mask drift: no EPI runs)"))
    if cfg.logger.mode != "disabled":
        logger = RunLogger(out_dir, mode=cfg.logger.mode, project=cfg.logger.project, name=cfg.logger.name or "eval", group="eval", config=OmegaConf.to_container(cfg, resolve=True))
        shown = [c for c in columns if c != "seeds"]
        logger.table("eval/scores", shown, [[report.fmt(r[c]) for c in shown] for r in rows])
        logger.close()


if __name__ == "__main__":
    main()
