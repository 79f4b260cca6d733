"""The installable package and the strategy registry: built-ins (found by scanning epi.strategies),
`register`, entry-point plug-ins (a throwaway distribution made in tmp), one way to declare a strategy's
keys (its `Config`), `python -m epi.strategies`, and no sys.path edits. A new built-in as one module
plus one YAML: tests/test_new_strategy.py."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import epi
import epi.strategies
from epi.errors import UserError
from epi.strategies import BUILTIN_ORIGIN, Strategy, build_strategy, register, registry
from epi.strategies.__main__ import config_keys, description, main
from tests.helpers import ROOT, TINY, make_cfg, run_script

PLUGIN_MODULE = '''
"""A test plug-in: what a third-party package ships."""

from dataclasses import dataclass

from epi.schema import Schema
from epi.strategies import Strategy


@dataclass
class FixedConfig(Schema):
    module: str = "lm_head"  # without a YAML (entry point toy_bare) the defaults are the Config's
    strength: float = 1.0
    tag: str | None = None


class FixedModule(Strategy):
    """Isolates one named module (test plug-in)."""

    Config = FixedConfig
'''

STRATEGY_YAMLS = sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))


def builtin_names() -> list[str]:
    """The built-ins as the registry finds them (scanning epi.strategies), in its order."""
    return [name for name, entry in registry.entries().items() if entry.origin == BUILTIN_ORIGIN]

PLUGIN_YAML = """_target_: toy_strategy.fixed.FixedModule
name: toy_yaml
module: model.layers.0
strength: 0.5
"""


def strategies_cli(*, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m epi.strategies` from outside the checkout: `epi` must come from the installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", "epi.strategies"], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def rows(stdout: str) -> dict[str, str]:
    """The CLI's table as {strategy name: its block of lines}."""
    blocks = stdout.split("\n\n")[1:]
    return {block.split(None, 1)[0]: block for block in blocks}


@pytest.fixture
def make_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict[str, str]], Path]]:
    """A distribution `toy-strategy` as pip would leave it in site-packages (package + *.dist-info with
    entry_points.txt), in a tmp folder put on sys.path: importlib.metadata finds it there, nothing is installed."""

    def make(entry_points: dict[str, str]) -> Path:
        site = tmp_path / "site"
        package = site / "toy_strategy"
        (package / "conf" / "strategy").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "fixed.py").write_text(PLUGIN_MODULE)
        (package / "conf" / "__init__.py").write_text("")
        (package / "conf" / "strategy" / "toy_yaml.yaml").write_text(PLUGIN_YAML)
        info = site / "toy_strategy-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-strategy\nVersion: 0.1\n")
        lines = [f"{name} = {value}" for name, value in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(["[epi.strategies]", *lines, ""]))
        monkeypatch.syspath_prepend(str(site))
        return site

    yield make
    for name in [m for m in sys.modules if m == "toy_strategy" or m.startswith("toy_strategy.")]:
        del sys.modules[name]


TOY = {"toy_bare": "toy_strategy.fixed:FixedModule", "toy_yaml": "toy_strategy.fixed:FixedModule"}


def test_builtins_are_registered_under_their_yaml_names_with_description_and_keys() -> None:
    """Every module's named Strategy subclass is a built-in, and each has its YAML (and each YAML its class)."""
    builtins = builtin_names()
    assert builtins == STRATEGY_YAMLS and list(registry)[: len(builtins)] == builtins  # built-ins first, by name
    assert {"none", "epi", "random", "cpi", "multistage", "fixed"} <= set(builtins)
    for name in builtins:
        entry = registry.entries()[name]
        cls = registry[name]
        assert issubclass(cls, Strategy) and entry.origin == "epi-sft" and cls.name == name
        composed = make_cfg(f"strategy={name}", tiny=False).strategy
        assert entry.target == composed._target_ and composed.name == name, f"{entry.value} and strategy={name} disagree"
        assert description(cls) and "\n" not in description(cls)
    assert config_keys(registry.entries()["none"], registry["none"]) == {}
    epi_keys = config_keys(registry.entries()["epi"], registry["epi"])
    assert epi_keys["p"] == make_cfg("strategy=epi", tiny=False).strategy.p and epi_keys["include.norms"] is False
    assert config_keys(registry.entries()["multistage"], registry["multistage"])["stage_data"] == "group"


def test_cli_lists_every_builtin(capsys: pytest.CaptureFixture) -> None:
    """In this process (the module run as `python -m` from outside the checkout: the plug-in tests below)."""
    assert main() == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert list(table) == builtin_names()
    assert "_target_: epi.strategies.epi.EPI" in table["epi"] and "refresh_every=100" in table["epi"]
    assert "(no keys)" in table["none"]
    assert all(len(line) <= 100 for line in out.splitlines())


def test_entry_point_plugin_is_listed_and_loaded_lazily(make_plugin: Callable) -> None:
    make_plugin(TOY)
    assert "toy_strategy.fixed" not in sys.modules  # listing names imports nothing
    entries = registry.entries()
    assert {"toy_bare", "toy_yaml"} <= set(entries) and entries["toy_bare"].origin == "toy-strategy"
    assert "toy_strategy.fixed" not in sys.modules
    cls = registry["toy_bare"]
    assert issubclass(cls, Strategy) and cls.__name__ == "FixedModule"
    assert description(cls) == "Isolates one named module (test plug-in)."
    assert config_keys(entries["toy_bare"], cls) == {"module": "lm_head", "strength": 1.0, "tag": None}
    assert config_keys(entries["toy_yaml"], cls) == {"module": "model.layers.0", "strength": 0.5}


def test_cli_lists_an_entry_point_plugin(make_plugin: Callable, tmp_path: Path) -> None:
    proc = strategies_cli(cwd=tmp_path, pythonpath=make_plugin(TOY))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = rows(proc.stdout)
    assert list(table)[: len(builtin_names())] == builtin_names() and {"toy_bare", "toy_yaml"} <= set(table)
    assert "Isolates one named module" in table["toy_bare"] and "(from toy-strategy)" in table["toy_bare"]
    assert "module=lm_head strength=1.0 tag=null" in table["toy_bare"]
    assert "module=model.layers.0 strength=0.5" in table["toy_yaml"]


@pytest.mark.slow
def test_plugin_yaml_on_the_search_path_trains_from_the_cli(make_plugin: Callable, tmp_path: Path) -> None:
    """The plug-in recipe (docs/new-strategy.md): the plug-in's conf/ on Hydra's search path, `strategy=<its YAML>`."""
    site = make_plugin(TOY)
    run = tmp_path / "run"
    args = ("hydra.searchpath=[pkg://toy_strategy.conf]", "strategy=toy_yaml", "schedule.steps=2", f"hydra.run.dir={run}")
    proc = run_script("train.py", *TINY, *args, cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = OmegaConf.load(run / "config.yaml").strategy
    assert resolved._target_ == "toy_strategy.fixed.FixedModule" and resolved.module == "model.layers.0"


def test_broken_or_clashing_plugins_are_one_line_errors(make_plugin: Callable, tmp_path: Path) -> None:
    site = make_plugin({"missing": "toy_strategy.fixed:Nope", "not_a_strategy": "toy_strategy.fixed:FixedModule.__init__"})
    with pytest.raises(UserError, match=r"strategy 'missing' = toy_strategy.fixed:Nope \(from toy-strategy\): cannot be loaded"):
        registry["missing"]
    with pytest.raises(UserError, match="is not a subclass of epi.strategies.Strategy"):
        registry["not_a_strategy"]
    proc = strategies_cli(cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 2 and "epi.strategies.epi.EPI" in proc.stdout
    assert rows(proc.stdout)["missing"].startswith("missing") and "error: strategy 'missing'" in proc.stdout


def test_a_plugin_cannot_take_a_builtin_name(make_plugin: Callable) -> None:
    make_plugin({"epi": "toy_strategy.fixed:FixedModule"})
    with pytest.raises(UserError, match=r"strategy name 'epi' is claimed twice: epi.strategies.epi:EPI \(from epi-sft\)"):
        registry.entries()


def test_register_adds_a_class_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(epi.strategies, "_registered", {})

    @register("local")
    class Local(Strategy):
        """A strategy defined in a notebook."""

    assert registry["local"] is Local and registry.entries()["local"].origin == "register()"
    with pytest.raises(ValueError, match="the name is taken by epi.strategies.epi:EPI"):
        register("epi")(Local)
    with pytest.raises(TypeError, match="is not a subclass"):
        register("plain")(object)


def test_only_a_module_s_own_named_subclass_is_a_builtin() -> None:
    """A helper base (EvolvingIsolation) and a subclass that inherits a name (a test's WatchedEPI) are not built-ins."""
    from tests.helpers import WatchedEPI

    values = {entry.value for entry in registry.entries().values()}
    assert "epi.strategies.epi:EvolvingIsolation" not in values and WatchedEPI.name == "epi"
    assert registry.entries()["epi"].value == "epi.strategies.epi:EPI"
    assert not any(value.startswith("tests.") for value in values)


class KeywordKeys(Strategy):
    """Keys as constructor keywords: the way that is gone (keys are the `Config`'s fields)."""

    def __init__(self, module: str = "lm_head"):
        super().__init__()
        self.module = module


def test_a_strategy_declares_its_keys_in_its_config_only() -> None:
    node = OmegaConf.create({"_target_": "tests.test_package.KeywordKeys", "module": "lm_head"})
    with pytest.raises(UserError, match=r"its constructor must take `cfg` \(the parsed KeywordKeys.Config\); a strategy declares its keys as the fields of its Config class"):
        build_strategy(node)


def test_the_package_is_installed_from_this_checkout() -> None:
    """The README's install (pip install -e .) points at this checkout, with torch pinned exactly."""
    try:
        dist = importlib.metadata.distribution("epi-sft")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("epi-sft is not installed: pip install -e \".[dev]\" (the README's test command does)")
    assert "torch==2.13.0" in dist.requires
    assert Path(epi.__file__).resolve().parent == ROOT / "epi"


def test_no_sys_path_edits_in_the_project() -> None:
    """Imports go through the installed package; a script that edits the import path hides a missing install."""
    edit = re.compile(r"\bsys\.path\s*(\.\s*(insert|append|extend)\s*\(|\+=|=(?!=)|\[[^]]*\]\s*=(?!=))")
    files = [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") or part == "site-packages" for part in p.relative_to(ROOT).parts)]
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1) if edit.search(line)]
    assert not offenders, offenders
