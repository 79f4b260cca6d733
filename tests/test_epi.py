"""EPI and its random control inside the real training loop: frozen means bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epi.logging import read_metrics
from epi.trainer import Trainer
from tests.helpers import EPI_FAST, crash_and_resume, make_cfg


def watched(*extra: str):
    return make_cfg(*EPI_FAST, "strategy._target_=tests.helpers.WatchedEPI", *extra)


@pytest.mark.parametrize("moments", ["track", "reset"])
def test_isolated_coordinates_bit_identical_across_refreshes_with_weight_decay(tmp_path: Path, moments: str) -> None:
    trainer = Trainer(watched(f"isolation.moments={moments}", "strategy.beta=0.9" if moments == "reset" else "strategy.beta=null"), tmp_path)
    trainer.fit()  # WatchedEPI asserts after every step
    refreshes = [step for step, _ in trainer.strategy.history if trainer.strategy.is_refresh(step)]
    assert refreshes == [2, 5, 8, 11, 14]


def expected_fraction(trainer: Trainer, p: float) -> float:
    """p of the linear weights (embeddings and norms do not take part by default), over all parameters."""
    numels = {n: q.numel() for n, q in trainer.named_params.items()}
    weights = sum(v for n, v in numels.items() if n in trainer.strategy.params)
    return round(p * weights) / sum(numels.values())


def test_refresh_exactly_on_schedule_and_logged(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*EPI_FAST), tmp_path)
    trainer.fit()
    events = [e for e in read_metrics(tmp_path) if e["split"] == "mask"]
    by_metric = {}
    for e in events:
        by_metric.setdefault(e["metric"], []).append((e["step"], e["value"]))
    assert [s for s, _ in by_metric["isolated_fraction"]] == [2, 5, 8, 11, 14]
    assert by_metric["jaccard_first"][0][1] == 1.0
    assert all(0.0 <= v <= 1.0 for _, v in by_metric["jaccard_prev"] + by_metric["jaccard_first"])
    assert by_metric["protected"][0][1] > 0 and by_metric["released"][0][1] == 0
    assert any(k.startswith("frac/model.layers.") for k in by_metric)
    assert all(v == pytest.approx(expected_fraction(trainer, 0.2)) for _, v in by_metric["isolated_fraction"])


def test_released_coordinates_move_again(tmp_path: Path) -> None:
    trainer = Trainer(watched("schedule.steps=6", "strategy.refresh_every=100"), tmp_path)
    trainer.fit()
    iso = trainer.optimizer
    released = iso.masks
    iso.set_masks({})  # release everything
    before = {n: trainer.named_params[n].detach().clone() for n in released}
    trainer.train_step(7)
    moved = sum(int((trainer.named_params[n].detach() != before[n])[m].sum()) for n, m in released.items())
    total = sum(int(m.sum()) for m in released.values())
    assert moved > 0.9 * total


def test_hysteresis_keeps_coordinates_until_they_miss_h_refreshes(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*EPI_FAST, "strategy.hysteresis=2", "schedule.steps=2"), tmp_path)
    trainer.fit()
    strategy = trainer.strategy
    first = trainer.optimizer.masks
    fake_top = {n: torch.zeros_like(m) for n, m in first.items()}  # nothing in the top set
    once = strategy._apply_hysteresis(first, fake_top)
    assert all(torch.equal(once[n], first[n]) for n in first)  # one miss: still isolated
    twice = strategy._apply_hysteresis(once, fake_top)
    assert not any(m.any() for m in twice.values())  # second consecutive miss: released


def test_epi_resume_is_exact_including_masks(tmp_path: Path) -> None:
    straight, resumed, state = crash_and_resume(tmp_path, [*EPI_FAST, "schedule.checkpoint_every=7"], 9)
    assert state["step"] == 7
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    a, c = straight.optimizer.masks, resumed.optimizer.masks
    assert a.keys() == c.keys() and all(torch.equal(a[n], c[n]) for n in a)


def test_random_control_runs_with_same_budget(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*EPI_FAST, "strategy=random", "strategy.p=0.2", "strategy.warmup=2", "strategy.refresh_every=3"), tmp_path)
    trainer.fit()
    fractions = [e["value"] for e in read_metrics(tmp_path) if e["metric"] == "isolated_fraction"]
    assert len(fractions) == 5 and all(v == pytest.approx(expected_fraction(trainer, 0.2)) for v in fractions)
