"""The experiment configs compose with every arm, and each runs end to end in a smoke setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from epi.config import validate
from epi.data.load import known_tasks
from epi.report import write_report
from epi.strategies import build_strategy
from tests.helpers import ROOT, TINY, make_cfg, run_script
from tests.paper_files import write_paper_files

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def swept_runs() -> list[tuple[str, list[str]]]:
    """(experiment, overrides) for every arm x list-valued choice an experiment's sweep names."""
    out = []
    for name in EXPERIMENTS:
        params = OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").hydra.sweeper.params
        arms = str(params.get("+arm", "")).split(",") if "+arm" in params else [None]
        out += [(name, [f"+arm={arm}"] if arm else []) for arm in arms]
    return out


@pytest.mark.parametrize("experiment,overrides", swept_runs())
def test_every_swept_arm_composes_and_validates(experiment: str, overrides: list[str]) -> None:
    cfg = make_cfg(f"experiment={experiment}", *overrides, tiny=False)
    if OmegaConf.is_missing(cfg.model, "name_or_path"):  # the paper recipes: the user names the 7B model
        cfg = make_cfg(f"experiment={experiment}", *overrides, "model.name_or_path=/models/Llama-2-7b-hf", tiny=False)
    validate(cfg, known_tasks(cfg.data))
    build_strategy(cfg.strategy)


# The paper recipes on the nano model and stand-in files in the five hub datasets' layouts (tests/paper_files.py),
# shrunk to CPU size; the HumanEval check is tested on its own (tests/test_execution.py).
PAPER = ["model=nano", "data.max_len=256", "schedule.batch_size=8", "schedule.grad_accum=1", "schedule.precision=fp32",
         "schedule.checkpoint_every=0", "schedule.warmup_steps=1", "strategy.probe_steps=2", "eval.general.tasks=[]",
         "eval.max_new_tokens=8", "eval.batch_size=8"]
SMOKE = {
    "cpi_ft_table1": [*PAPER, "+arm=none,multistage_random_k3,cpi", "schedule.steps=6"],
    "cpi_ft_forgetting": [*PAPER, "+arm=cpi_sequential_equal_compute", "pair=[gsm8k,logiqa]", "stage_steps=4"],
    "epi_paper": [*PAPER, "+arm=epi", "schedule.steps=6", "strategy.warmup=2", "strategy.refresh_every=2"],
    "table_multitask": ["+arm=none,cpi,expert_math"],
    "table_forgetting": ["+arm=none,cpi_sequential", "pair=[code,math]", "stage_steps=3"],
    "drift": ["schedule.steps=6", "strategy.warmup=2", "strategy.refresh_every=2"],
    # the pretrained testbed's sweep, shrunk to the tiny model (SmolLM2 itself: tests/test_train.py)
    "smollm2_forgetting": ["model=tiny", "+arm=none,epi_exclusive", "pair=[code,instruct]", "stage_steps=3",
                           "strategy.warmup=1", "strategy.refresh_every=2", "eval.retention=2"],
    "smollm2_multitask": ["model=tiny", "+arm=none,cpi_equal_compute,expert_code", "schedule.steps=12", "strategy.probe_steps=2",
                          "eval.retention=2"],
    # the tuner: 2 Optuna trials, each a run scored on val
    "tune_epi": ["hydra.sweeper.n_trials=2", "schedule.steps=6", "strategy.warmup=2"],
}
# Experiments only composed and validated (above), not run: the same sweeper and loop as one that is.
COMPOSED_ONLY = {"tune_cpi": "tune_epi's sweeper with CPI's keys", "tune_mofo": "tune_epi's sweeper with MoFO's key"}


def test_every_experiment_is_run_or_said_to_be_composed_only() -> None:
    assert sorted([*SMOKE, *COMPOSED_ONLY]) == EXPERIMENTS


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(SMOKE))
def test_experiment_runs_in_a_smoke_setting(experiment: str, tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    extra = SMOKE[experiment]
    tiny = list(TINY)
    if "model=nano" in extra:  # a paper recipe: its five tasks from local stand-in files
        extra = [*write_paper_files(tmp_path / "paper"), *extra]
    # the basic launcher: the arms one after another in one process (joblib's workers would each import torch again
    # on the one core a test worker has; the launcher itself is tested in tests/test_sweeps.py and tests/test_slurm.py)
    proc = run_script("train.py", "-m", f"experiment={experiment}", "seed=0", *tiny, *extra, f"hydra.sweep.dir={sweep}",
                      "hydra/launcher=basic", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the report in-process (eval.py runs=... itself: tests/test_report.py); a tuner's trials are scored on val only
    write_report(sweep, tmp_path / "report", split="val" if experiment.startswith("tune") else "test")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Scores" in text
    if experiment in ("table_forgetting", "smollm2_forgetting"):
        assert "delta_A" in text
    if experiment in ("smollm2_forgetting", "smollm2_multitask"):
        assert "retention ppl before" in text
    if experiment == "smollm2_multitask":  # the equal-compute arm: its probes' steps come out of the budget
        table = text.split("## Scores")[1].split("\n\n")[1].splitlines()
        column = [c.strip() for c in table[0].split("|")].index("steps")
        steps = {row.split("|")[1].strip(): int(row.split("|")[column]) for row in table[2:]}
        assert steps["arm=cpi_equal_compute"] == steps["arm=none"] == 12, steps
    if experiment == "tune_epi":  # two trials, each evaluated on val (tuning never reads test), and Optuna's choice
        trials = sorted(p for p in sweep.iterdir() if p.is_dir())
        assert len(trials) == 2 and all((t / "eval_val.json").is_file() and not (t / "eval_test.json").exists() for t in trials)
        best = OmegaConf.load(sweep / "optimization_results.yaml")
        assert set(best.best_params) == {"strategy.p", "strategy.refresh_every"} and 0 <= best.best_value <= 1
    if experiment == "cpi_ft_table1":  # the paper's multi-stage row: the five tasks in K=3 stages, no probe trained
        groups = [json.loads((run / "cpi" / "groups.json").read_text()) for run in sweep.iterdir() if (run / "cpi").is_dir()]
        by_k = {g["k"]: g["groups"] for g in groups}  # cpi's groups come from its cores at tau (k null)
        assert set(by_k) == {None, 3} and [len(g) for g in by_k[3]] == [2, 2, 1]
    if experiment == "cpi_ft_forgetting":
        assert "delta_A" in text
    if experiment == "drift":
        assert (tmp_path / "report" / "drift.png").is_file()
