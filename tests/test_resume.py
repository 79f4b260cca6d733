"""Resume in-process and at its edges: a run killed before its first checkpoint points to resume=auto, and a run
resumed right after a stage ends runs that stage's closing work exactly once (SIGKILL and the CLI:
tests/test_resume_cli.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from epi import checkpoint
from epi import run as train_script
from epi.logging import read_metrics
from tests.helpers import TINY, make_cfg, run_script


@pytest.mark.slow
def test_resume_of_a_run_killed_before_its_first_checkpoint_points_to_resume_auto(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")  # what a run killed while writing its first checkpoint leaves
    (run / "checkpoint.pt.tmp").write_bytes(b"half")
    proc = run_script("train.py", *TINY, "strategy=none", f"resume={run}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: resume='{run}': no checkpoint at {run / 'checkpoint.pt'}: the run in {run} stopped before")
    assert "resume=auto" in line


def test_resume_right_after_a_stage_ends_runs_its_closing_work_exactly_once(tmp_path: Path, monkeypatch) -> None:
    stages = "schedule.stages=[{name: a, tasks: [math], steps: 4}, {name: b, tasks: [code], steps: 4}]"
    overrides = ["strategy=none", stages, "schedule.checkpoint_every=4"]
    run = tmp_path / "run"
    real_save = checkpoint.save

    def save_then_crash(path, state):
        real_save(path, state)
        if state["step"] == 4:
            raise KeyboardInterrupt  # killed right after the checkpoint at stage a's last step

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_script.train(make_cfg(*overrides), run)
    monkeypatch.setattr(checkpoint, "save", real_save)
    train_script.train(make_cfg(*overrides, f"resume={run}"), run)

    events = read_metrics(run)
    closing = Counter((e["split"], e["task"]) for e in events if e["split"].startswith("test/after_stage") and e["metric"] == "score")
    assert set(closing) == {(f"test/after_stage{k}", t) for k in (0, 1) for t in ("math", "code", "logic", "instruct", "format")}
    assert set(closing.values()) == {1}
    assert [e["step"] for e in events if e["split"] == "train" and e["metric"] == "loss"] == list(range(1, 9))
    assert Counter(e["task"] for e in events if e["split"] == "mixture" and e["metric"] == "examples") == {
        t: 2 for t in ("math", "code", "logic", "instruct", "format")
    }
