"""Smoke test of bench/bench_isolation.py: exclusive isolation on packed batches (`--mode exclusive --packing`, the
row split over tokens gathered task by task) runs end to end on tiny and prints its settings and one table row
whose ratio, memory and isolated share are numbers in range."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_exclusive_on_packed_batches_prints_its_row() -> None:
    out = subprocess.run(
        [sys.executable, "bench/bench_isolation.py", "--models", "tiny", "--steps", "2", "--repeats", "1", "--refreshes", "1",
         "--mode", "exclusive", "--packing", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "EPI mode=exclusive, task_split=rows, packed batches" in lines[0], lines[0]
    (row,) = [cells for line in lines if len(cells := [c.strip() for c in line.split("|")]) == 10 and cells[1] == "tiny"]
    step_none, step_epi, refresh = float(row[3]), float(row[4]), float(row[5])
    ratio, extra, isolated = float(row[6].split()[0]), float(row[7]), float(row[8])
    assert min(step_none, step_epi, refresh) > 0 and ratio > 0, row
    assert 0 < extra < 1 and 0 < isolated < 1, row  # the owned coordinates' index: within a byte per parameter
