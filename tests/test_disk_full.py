"""A full disk: the checkpoint write fails with one line, its temp file is removed and the earlier checkpoint is
intact; through train.py the line says how to go on (or, before any checkpoint, how to start again)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epi import checkpoint
from epi.errors import UserError
from tests.helpers import TINY, run_script


def test_disk_full_checkpoint_one_line_temp_removed_earlier_checkpoint_intact(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, {"step": 1, "w": torch.zeros(4)})
    tmp = path.with_name(path.name + ".tmp")
    tmp.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    with pytest.raises(UserError, match=r"no space left on device writing checkpoint .*checkpoint.pt \(needs about 4.0 MB.*"
                                        r"Free space and continue from its checkpoint"):
        checkpoint.save(path, {"step": 2, "w": torch.zeros(1_000_000)})
    assert not tmp.exists() and not tmp.is_symlink()
    assert checkpoint.load_tensors(path, "checkpoint")["step"] == 1


@pytest.mark.slow
def test_disk_full_through_train_py_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt.tmp").symlink_to("/dev/full")
    proc = run_script("train.py", *TINY, "strategy=none", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no space left on device writing checkpoint") and "Traceback" not in proc.stderr
    # its first checkpoint: there is nothing to resume from, and the line says how to start again instead
    assert "No checkpoint of this run was written before: free space and start it again (resume=auto" in lines[-1]
    assert "continue from its checkpoint" not in lines[-1]
    assert not (run / "checkpoint.pt.tmp").is_symlink() and not (run / "model").exists()
