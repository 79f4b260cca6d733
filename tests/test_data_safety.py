"""Reading data runs no code: what a run reads as text (here the retention corpus) never imports a file that
merely shares a module's name. The loaders' own guarantees are listed in the docstrings of epi/data/sources.py
and epi/data/local.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from epi import retention
from epi.errors import UserError


def test_retention_corpus_refuses_a_module_shadowing_the_standard_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `python -m` (submitit's SLURM jobs) the working directory comes first on sys.path: an html.py there was
    imported, and so run, in place of the standard library's html, and its docstring changed the corpus."""
    marker = tmp_path / "ran"
    (tmp_path / "html.py").write_text(f'"""Not the standard library."""\nopen({str(marker)!r}, "w").close()\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "html", raising=False)
    with pytest.raises(UserError) as err:
        retention.corpus()
    assert str(err.value) == (
        f"retention corpus: module 'html' would be imported from {tmp_path / 'html.py'}, not from the standard library; "
        "rename that file or run from another directory (eval.retention reads standard-library docstrings)"
    )
    assert not marker.exists()
