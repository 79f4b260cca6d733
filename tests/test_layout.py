"""The codebase keeps its shape: the run directory's file names have one owner, no import cycles, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

from epi import rundir
from tests.conftest import ROOT

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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """epi module -> the epi modules it imports at module level (imports inside functions are deferred on purpose)."""
    modules = {_module_name(p): p for p in SOURCES if p.is_relative_to(ROOT / "epi")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["epi.trainer"]  # the graph was read
    # a package's __init__ importing its own submodules is not a cycle of the code's layers
    layered = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    assert find_cycle(layered) is None, " -> ".join(find_cycle(layered))


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SOURCES}
    large = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not large, f"split these by job (at most {MAX_LINES} lines): {large}"
