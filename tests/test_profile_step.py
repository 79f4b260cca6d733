"""bench/profile_step.py --packing: data.packing's gain over the padded step, factor by factor, on the batches the
trainer draws."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_packing_parts_multiply_to_the_step_ratio_and_bound_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_step.py"), "--packing", "--steps", "2", "--threads", "1",
         "--override", "model.num_layers=1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # among others: the steps drew the batches timed alone
    assert proc.stdout.splitlines()[0].endswith("; overrides: model.num_layers=1"), proc.stdout
    rows = dict(re.findall(r"^\| (padded|packed) \| (\d+) \| [\d.]+% \|", proc.stdout, re.M))
    assert set(rows) == {"padded", "packed"} and int(rows["packed"]) < int(rows["padded"]), proc.stdout
    rest = re.search(r"of which [\d.]+ s is not forward and backward \(([\d.]+)%", proc.stdout)
    assert rest and 0 <= float(rest[1]) < 50, proc.stdout  # the optimizer's work: a share of the step, not all of it
    factors = re.search(r"= ([\d.]+) \(cells\) / ([\d.]+) \(a packed cell's cost\) -> ([\d.]+)x forward and backward -> ([\d.]+)x the step",
                        proc.stdout)
    assert factors, proc.stdout
    cells, dearer, fb, step = map(float, factors.groups())
    assert cells == pytest.approx(int(rows["padded"]) / int(rows["packed"]), rel=5e-3)  # the table rounds the means
    assert fb == pytest.approx(cells / dearer, rel=2e-3) and 1 < step <= fb  # the unchanged rest dilutes the gain
    bound = float(re.search(r"with no padding left at all .* at most ([\d.]+)x", proc.stdout)[1])
    assert bound >= step
