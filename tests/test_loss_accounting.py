"""The numbers a step computes: the loss is token-weighted across micro-batches and ranks (grad_accum=k equals one
batch k times larger, two ranks equal one process), and the logged learning rate is the one the step applied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epi.logging import read_metrics
from epi.trainer import Trainer
from tests.helpers import TINY, make_cfg, recorded, two_ranks_and_one_process


def test_grad_accum_equals_one_batch_k_times_larger(tmp_path: Path) -> None:
    accum = recorded(tmp_path, "schedule.batch_size=4", "schedule.grad_accum=3")
    big = recorded(tmp_path, "schedule.batch_size=12", "schedule.grad_accum=1")
    for step, (a, b) in enumerate(zip(accum.strategy.grads, big.strategy.grads), start=1):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")
    assert [e["value"] for e in read_metrics(accum.run_dir) if e["metric"] == "loss"] == pytest.approx(
        [e["value"] for e in read_metrics(big.run_dir) if e["metric"] == "loss"], rel=1e-6
    )
    for (name, a), b in zip(accum.model.state_dict().items(), big.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("packing", ["false", "true"])  # packed: each rank packs its own share of the batch
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path: Path, packing: str) -> None:
    two_ranks_and_one_process(tmp_path, [*TINY, "strategy=none", "schedule.steps=3", "schedule.batch_size=8", f"data.packing={packing}"])


def test_logged_lr_is_the_one_the_step_applied(tmp_path: Path) -> None:
    cfg = make_cfg("strategy=none", "schedule.steps=4", "schedule.warmup_steps=4", "optimizer.lr=1e-3")
    Trainer(cfg, tmp_path).fit()
    lrs = [e["value"] for e in read_metrics(tmp_path) if e["metric"] == "lr"]
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])  # linear warm-up: step k applies k/4 of lr
