"""bench/padding.py: the padded share of the cells, stream order against length grouping and packing, on the built-in
mixture and on paper_mix files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_padding_report_shows_grouping_cuts_padding_on_both_mixtures(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "padding.py"), "--batches", "40", "--group", "10", "--paper-files", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (built-in|paper_mix \(synthetic files\)) \| (\d+) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \|$",
                      proc.stdout, re.M)
    assert [(r[0], r[1]) for r in rows] == [("built-in", "128"), ("paper_mix (synthetic files)", "1024")]  # each mixture's own max_len
    for _, _, before, after, saved, packed in rows:
        assert float(after) < float(before) / 4 and float(saved) > 0
        assert float(packed) < 3.0, proc.stdout  # data.packing: task-mixed batches in stream order, under 3% padding (issue 28)
