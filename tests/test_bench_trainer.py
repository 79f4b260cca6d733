"""Smoke test of bench/bench_trainer.py: `--quick` runs every side end to end and prints the markdown table
(`--no-compile`: the compiled step's own test is tests/test_lm_head.py; compiling here would add a minute)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_quick_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_trainer.py"), "--quick", "--no-compile", "--threads", "1"],  # one thread: an xdist worker has one core
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "| model | params | batch | side | trained tok/s | tok/s | s/step | padding | peak memory | project / side |" in lines
    rows = {cells[4]: cells for line in lines if len(cells := [c.strip() for c in line.split("|")]) > 10 and cells[1] == "tiny"}
    ladder = {"project-before", "+trained-head", "+fused-adamw", "project", "+bf16"}  # tiny has no chat template
    expected = ladder | {"packed", "trainer", "trainer-stream"} | ({"trl"} if importlib.util.find_spec("trl") else set())
    assert set(rows) == expected, out.stdout
    for name, cells in rows.items():
        assert float(cells[5]) > 0 and float(cells[6]) > float(cells[5]), cells  # trained tok/s < tok/s
        assert (cells[10] == "–") if name == "project" else cells[10].endswith("x"), cells
    steps = {c[2]: c for line in lines if len(c := [x.strip() for x in line.split("|")]) == 7 and c[1] == "tiny"}
    assert set(steps) == ladder and steps["project-before"][4] == "–", out.stdout  # the step-time ladder
    assert all(c[5].endswith("x") for c in steps.values()), out.stdout
    best = next(line for line in lines if line.startswith("tiny: the project at its best settings in fp32"))
    assert "trainer " in best and best.endswith("x"), best
    packed = {c[2]: c for line in lines if len(c := [x.strip() for x in line.split("|")]) == 8 and c[1] == "tiny"}
    assert set(packed) == {"packed", "+fused-adamw", "trainer-stream"} | ({"trl"} & set(rows)), out.stdout  # task-mixed, no grouping
    assert packed["packed"][6] == "–" and all(c[6].endswith("x") for name, c in packed.items() if name != "packed")
    assert float(packed["packed"][5].rstrip("%")) < float(packed["+fused-adamw"][5].rstrip("%")), packed  # less padding
    if "trl" not in rows:
        assert "TRL: not installed; the trl side is left out" in lines


def test_a_trl_that_does_not_import_is_named_and_left_out(tmp_path: Path) -> None:
    """An installed TRL whose import fails (a dependency of another version) is reported before any side runs,
    not met at the `trl` side after the others have run."""
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "__init__.py").write_text("raise ImportError('datasets needs pyarrow>=24')\n")
    code = "from bench_trainer import trl_unavailable, versions; print(trl_unavailable()); print(versions())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "bench")])})
    assert out.returncode == 0, out.stderr[-2000:]
    why, versions = out.stdout.splitlines()[-2:]
    assert why == "installed but not importable (ImportError: datasets needs pyarrow>=24)", out.stdout
    assert versions.startswith("torch ") and "trl" not in versions, versions
