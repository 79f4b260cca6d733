"""Two data-parallel CPU processes (torchrun, gloo): identical masks and frozen coordinates on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from epi.logging import read_metrics
from tests.helpers import EPI_FAST, ROOT, TINY, WatchedEPI

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


class RankCheckedEPI(WatchedEPI):
    """WatchedEPI (isolated values never move) plus: after each refresh, every rank holds the same masks and weights."""

    def refresh(self, step: int) -> None:
        super().refresh(step)
        mask_sum = sum(float(m.nonzero().sum()) + float(m.sum()) for m in self.ctx.masks().values())
        weight_sum = sum(float(p.double().sum()) for p in self.ctx.named_params.values())
        mine = torch.tensor([mask_sum, weight_sum], dtype=torch.float64)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        assert all(torch.equal(x, mine) for x in everyone), f"ranks disagree at step {step}: {everyone}"
        self.ctx.log(step, "ddp", {"ranks_agree": 1.0})


def test_two_ranks_share_masks_and_frozen_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "train.py"), *TINY, *EPI_FAST, "strategy._target_=tests.test_ddp.RankCheckedEPI",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    agree = [e["step"] for e in read_metrics(run) if e["split"] == "ddp"]
    assert agree == [2, 5, 8, 11, 14]
    assert (run / "model").is_dir() and not (run / "checkpoint.pt").exists()  # rank 0 removed it once the run finished
