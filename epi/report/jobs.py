"""eval.py's two jobs, each callable in-process with eval.yaml's config and an output directory:

- `evaluate_model`: one train.py run's model (run_dir=) or any Hugging Face model (model_dir=) scored on a split,
  and on the general checks (eval.general.tasks);
- `report_runs`: the report over finished runs (runs=...; see epi.report.document), with archive= a copy of
  their evidence.
`job_of(cfg)` says which one a config asks for (exactly one of run_dir, model_dir, runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from epi import archive, rundir
from epi.cli import write_results
from epi.config import EvalConfig
from epi.data.load import encode_tasks, load_general, load_tasks
from epi.data.local import expand_root
from epi.distributed import pick_device
from epi.errors import UserError
from epi.evaluate import evaluate, generation_limits
from epi.general import SPLIT as GENERAL, encode_general, evaluate_general
from epi.judge import judge_for
from epi.logging import RunLogger
from epi.models import build_model
from epi.plots import plot_drift, plot_task_drift
from epi.report.document import Report, write_report
from epi.report.tables import fmt
from epi.schema import parse

Job = Callable[[DictConfig, Path], object]


def job_of(cfg: DictConfig) -> Job:
    """`report_runs` for runs=, else `evaluate_model`; a UserError unless exactly one of run_dir, model_dir, runs is
    given, and for archive= without runs= (both before anything is written)."""
    given = [k for k in ("run_dir", "model_dir", "runs") if cfg[k] is not None]
    if len(given) != 1:
        raise UserError("give exactly one of run_dir=<train.py run>, model_dir=<Hugging Face model dir>, runs=<dir or [dirs]>")
    if cfg.archive is not None:
        if cfg.runs is None:
            raise UserError("archive=<dir> copies the evidence of runs=<dir or [dirs]>; give runs= too")
        archive.check_destination(Path(cfg.archive))  # before any table is written
    return report_runs if cfg.runs is not None else evaluate_model


def evaluate_model(cfg: DictConfig, out_dir: Path) -> None:
    """Scores run_dir's model on the run's own task mixture, or model_dir's on the `data` mixture (a run's model/
    counts as its run), writing the split's results, table and predictions to `out_dir`, and for a run its mask
    drift plots. The general checks (eval.general.tasks) go to eval_general.json / .md and predictions_general.jsonl."""
    e = parse(cfg.eval, EvalConfig, "eval")
    data, model_dir, run_dir = cfg.data, cfg.model_dir, cfg.run_dir
    if model_dir is not None and (Path(model_dir).parent / rundir.CONFIG).is_file():
        run_dir = str(Path(model_dir).parent)  # a run's model/: scored on the run's own tasks, not the data defaults
        print(f"model_dir={model_dir!r} is a run's model: evaluating on that run's data config ({run_dir}/{rundir.CONFIG})")
    if run_dir is not None:
        run_cfg = Path(run_dir) / rundir.CONFIG
        if not (Path(run_dir) / rundir.MODEL).is_dir() or not run_cfg.is_file():
            raise UserError(f"run_dir={run_dir!r} has no {rundir.MODEL}/ and {rundir.CONFIG}; is it a finished train.py run directory?")
        # over the `data` defaults: a run from before a data key existed gets that key's default
        defaults = OmegaConf.create(OmegaConf.to_container(cfg.data))  # a plain copy: the run may add keys (sources)
        data, model_dir = OmegaConf.merge(defaults, OmegaConf.load(run_cfg).data), str(Path(run_dir) / rundir.MODEL)
    data = expand_root(data)  # data=local: one task per folder under data.root
    raw, raw_general = load_tasks(data), load_general(e.general.tasks, data)
    cfg.model.name_or_path = model_dir  # composed from conf/model/hf.yaml (eval.yaml's defaults)
    model, tok = build_model(cfg.model)
    device = pick_device(cfg.device)
    model.to(device)
    judge = judge_for([*raw.values(), *raw_general.values()], e.judge, device)
    encoded = encode_tasks(tok, raw, data)
    tasks = {name: enc.task for name, enc in encoded.items()}
    limits = generation_limits({name: enc.longest_reply for name, enc in encoded.items()}, e.max_new_tokens, e.fit_generation)
    predictions: list[dict] = []
    results = evaluate(
        model, tok, tasks, split=e.split, n_examples=e.n_examples, batch_size=e.batch_size, max_new_tokens=limits,
        max_len=data.max_len, truncate=data.truncate, predictions=predictions, execution=e.execution, judge=judge,
    )
    scorers = {name: task.scorer for name, task in tasks.items()}
    print(write_results(out_dir, e.split, results, scorers, f"{model_dir} ({e.split} split)", predictions))
    if raw_general:
        general_tasks = encode_general(tok, raw_general, data, e.split)
        general_results, records = evaluate_general(model, tok, general_tasks, e, data, judge)
        general_scorers = {name: task.scorer for name, task in general_tasks.items()}
        print(write_results(out_dir, GENERAL, general_results, general_scorers, f"{model_dir}: general ability ({e.split} split)", records))
    if run_dir is not None and plot_drift({Path(run_dir).name: Path(run_dir)}, out_dir / "drift.png"):
        print(f"mask drift plot: {out_dir / 'drift.png'}")
    if run_dir is not None and plot_task_drift(Path(run_dir), out_dir / "task_drift.png"):
        print(f"per-task mask drift and overlap (exclusive isolation): {out_dir / 'task_drift.png'}")


def report_runs(cfg: DictConfig, out_dir: Path) -> Report:
    """The report over runs= (a directory, an archive, or a list of them) into `out_dir`, printed; with archive=,
    the runs' evidence copied there; with a logger, the score table logged as `eval/scores`."""
    paths = [Path(p) for p in (cfg.runs if OmegaConf.is_list(cfg.runs) else [cfg.runs])]
    dest = Path(cfg.archive) if cfg.archive is not None else None
    report = write_report(paths, out_dir, split=cfg.eval.split, baseline=cfg.baseline, archive=dest)
    print(report.markdown)
    if report.archived is not None:
        files, size = report.archived
        print(f"archived the evidence of {len(report.runs) + len(report.unfinished)} runs to {cfg.archive}: {files} files, "
              f"{size / 1e6:.2f} MB (tabulate it with python eval.py runs={cfg.archive})")
    print(f"plots: {', '.join(p.name for p in report.plots)}" + ("" if report.drift else " (no mask drift: no EPI runs)"))
    if cfg.logger.mode != "disabled":
        logger = RunLogger(out_dir, mode=cfg.logger.mode, project=cfg.logger.project, name=cfg.logger.name or "eval", group="eval",
                           config=OmegaConf.to_container(cfg, resolve=True))
        shown = [c for c in report.columns if c != "seeds"]
        logger.table("eval/scores", shown, [[fmt(r[c]) for c in shown] for r in report.rows])
        logger.close()
    return report
