"""Smoke test of bench/bench_gpu.py: `--quick` runs every side on CPU end to end (tiny, fp32, 2 timed steps,
1 repeat) and prints the table, one row per side, and the ratio lines; a side that goes missing fails it. `--override`
reaches every side, `trainer` too (it trains a copy of the project's model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

HEADER = "| model | params | batch | side | trained tok/s | tok/s | s/step | padding | peak memory | MFU | extra bytes/param |"
SIDES = ["none", "epi", "cpi-stage", "trainer"]  # in the order the script builds them
RATIOS = {
    "none / trainer": "tiny: none / trainer, trained tok/s: ",
    "epi / none": "tiny: epi / none step time, refresh (",
    "cpi-stage / none": "tiny: cpi-stage / none step time, ",
    "extra bytes": "tiny: extra bytes per parameter beyond AdamW: ",
}


@pytest.mark.parametrize("packing", [False, True])
def test_quick_prints_every_side_and_the_ratios(packing: bool) -> None:
    out = subprocess.run(
        [sys.executable, "bench/bench_gpu.py", "--quick", "--threads", "1",
         *(["--packing", "--override", "model.num_layers=2"] if packing else [])],  # --override: every project side's config
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "(cpu), 1 threads, fp32, batch 16" in lines[0] and "MFU against n/a" in lines[0], lines[0]
    assert HEADER in lines, out.stdout
    rows = {cells[4]: cells for line in lines if len(cells := [c.strip() for c in line.split("|")]) == 13 and cells[1] == "tiny"}
    assert list(rows) == SIDES, out.stdout
    assert {cells[2] for cells in rows.values()} == {"1.8M" if packing else "3.4M"}, rows  # 2 of tiny's 4 layers: 1,778,944
    for name, cells in rows.items():
        trained, tokens, step = float(cells[5]), float(cells[6]), float(cells[7])
        assert 0 < trained < tokens and step > 0, cells
        assert cells[10] == "n/a", cells  # MFU: CPU without --peak-flops
        assert (cells[11] == "–") if name == "trainer" else float(cells[11]) >= 0, cells
    assert float(rows["none"][11]) == 0 and float(rows["epi"][11]) > 0 and float(rows["cpi-stage"][11]) > 0
    padding = {name: float(cells[8].rstrip("%")) for name, cells in rows.items()}
    if packing:  # the project's sides pack the task-mixed batches that `trainer` pads, in the same order
        assert "packed task-mixed batches (trainer: padded, stream order), attention sdpa" in lines[0], lines[0]
        assert max(padding[name] for name in ("none", "epi", "cpi-stage")) < padding["trainer"] / 4, padding
    else:
        assert "length-grouped batches, attention sdpa" in lines[0], lines[0]

    found = {key: [line for line in lines if line.startswith(prefix)] for key, prefix in RATIOS.items()}
    assert all(len(hits) == 1 for hits in found.values()), found
    assert re.search(r": \d+\.\d+x \(target >= 1\.00x: (met|not met)\)$", found["none / trainer"][0])
    assert re.search(r"amortised over 100 steps: \d+\.\d+x \[\d+\.\d+, \d+\.\d+\] \(target <= 1\.03x: (met|not met)\)$", found["epi / none"][0])
    held = re.search(r"(\d+\.\d+)% of the parameters held: \d+\.\d+x \[", found["cpi-stage / none"][0])
    assert held and 0.5 < float(held.group(1)) < 1.0, found["cpi-stage / none"]  # 1% of the linear weights, ~94% of tiny
    assert re.search(r"epi \d+\.\d+, cpi-stage \d+\.\d+ \(target <= 1\.00 byte: met\)$", found["extra bytes"][0])
