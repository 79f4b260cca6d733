"""The codebase keeps its shape: the run directory's file names have one owner, and modules stay small (the import
graph has no cycle: tests/test_architecture.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from epi import rundir
from tests.helpers import ROOT

SOURCES = sorted([*(ROOT / "epi").rglob("*.py"), ROOT / "train.py", ROOT / "eval.py"])
MAX_LINES = 450
# The run directory's file names as rundir.py spells them. MODEL ("model") and CPI_DIR ("cpi") are left out: as
# words they also name a state-dict key and a strategy.
OWNED = {rundir.CONFIG, rundir.METRICS, rundir.CHECKPOINT, rundir.SHARDS, rundir.ERROR, rundir.LOG, rundir.LOCK,
         rundir.WANDB_ID, rundir.RETENTION, rundir.HYDRA_RECORD, rundir.HYDRA_FILE, rundir.HYDRA_OVERRIDES}
OWNED_PATTERNS = [("eval_", ".json"), ("eval_", ".md"), ("predictions_", ".jsonl")]  # f"eval_{split}.json", ...


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def spelled_file_names(path: Path) -> list[str]:
    """String constants (docstrings aside) that are a run-directory file name, and f-strings built like one."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value in OWNED or node.value.rsplit("/", 1)[-1] in OWNED:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
            if len(parts) == 2 and (parts[0], parts[1]) in OWNED_PATTERNS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: f{parts[0]!r}...{parts[1]!r}")
    return found


def test_only_rundir_spells_a_run_directory_file_name() -> None:
    spelled = [hit for path in SOURCES if path != ROOT / "epi" / "rundir.py" for hit in spelled_file_names(path)]
    assert not spelled, "import the name from epi.rundir instead:\n" + "\n".join(spelled)


def test_the_check_finds_a_spelled_name(tmp_path: Path) -> None:
    """The check above is not vacuous: a module that spells one is caught."""
    module = ROOT / "epi" / "_layout_probe.py"
    try:
        module.write_text('PATH = "metrics.jsonl"\nNAME = f"eval_{1}.json"\n')
        assert len(spelled_file_names(module)) == 2
    finally:
        module.unlink()


def test_no_module_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SOURCES}
    large = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not large, f"split these by job (at most {MAX_LINES} lines): {large}"
