"""A run that diverges stops with one line and keeps its last good checkpoint (or, with schedule.nonfinite=skip,
drops the bad updates and finishes); NaN or inf importance scores are an error, never a silent mask."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epi import checkpoint
from epi.errors import TrainingDiverged
from epi.logging import read_metrics
from epi.masks import NonFiniteScores, top_p
from epi.strategies.epi import EPI
from epi.trainer import Trainer
from tests.helpers import TINY, make_cfg, run_script


DIVERGING = [*TINY, "strategy=none", "optimizer.lr=1e4", "schedule.steps=8", "schedule.checkpoint_every=1"]


@pytest.mark.slow
def test_divergence_stops_with_one_line_keeps_the_last_good_checkpoint_and_saves_no_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *DIVERGING, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "not finite" in line and "optimizer.lr" in line and "schedule.nonfinite=skip" in line
    bad_step = next(e["step"] for e in read_metrics(run) if e["split"] == "nonfinite")
    state = checkpoint.load(str(run))
    assert state["step"] == bad_step - 1 and f"(step {bad_step - 1})" in line
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "model").exists() and not (run / "eval_test.json").exists()


@pytest.mark.slow
def test_skip_policy_drops_the_updates_counts_them_and_finishes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *DIVERGING, "schedule.nonfinite=skip", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_metrics(run)
    bad = [e["step"] for e in events if e["split"] == "nonfinite" and e["metric"] == "loss"]
    assert bad and bad == list(range(bad[0], 9))  # a skipped update leaves the weights as they were: it recurs
    skipped = [e["value"] for e in events if e["metric"] == "skipped_steps"]
    assert skipped[-1] == len(bad)
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("method", ["exact", "sampled"])
@pytest.mark.parametrize("scope", ["global", "layer", "tensor"])
def test_nan_importance_is_an_error_in_every_selection_method(method: str, scope: str) -> None:
    scores = {"layers.0.w": torch.rand(64, 64), "layers.1.w": torch.rand(64, 64)}
    scores["layers.1.w"][3, 5] = math.nan
    with pytest.raises(NonFiniteScores, match="layers.1.w"):
        top_p(scores, 0.01, scope=scope, method=method, sample_size=100, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_an_inf_score_is_an_error_and_an_overflowing_sum_of_finite_scores_is_not(bad: float) -> None:
    """top_p checks finiteness from the sum first: inf, -inf and NaN are caught; finite scores whose sum
    overflows float32 are still ranked."""
    huge = {"layers.0.w": torch.full((8, 8), 3e38), "layers.1.w": torch.rand(8, 8)}
    assert not torch.isfinite(huge["layers.0.w"].sum())
    assert top_p(huge, 0.5)["layers.0.w"].all()
    huge["layers.1.w"][2, 2] = bad
    with pytest.raises(NonFiniteScores, match="layers.1.w"):
        top_p(huge, 0.5)


class NaNImportanceEPI(EPI):
    def importance(self):
        scores = super().importance()
        next(iter(scores.values())).view(-1)[0] = math.nan
        return scores


def test_nan_importance_stops_epi_with_a_clear_line(tmp_path: Path) -> None:
    cfg = make_cfg("strategy=epi", "strategy._target_=tests.test_divergence.NaNImportanceEPI", "strategy.warmup=2")
    with pytest.raises(TrainingDiverged, match=r"step 2: importance .* NaN or inf"):
        Trainer(cfg, tmp_path).fit()
