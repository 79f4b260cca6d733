"""Isolation strategies and the registry of their names.

A strategy is a `Strategy` subclass whose keys are its typed `Config` (an epi.schema dataclass: types,
allowed values, ranges), picked by a YAML in conf/strategy/ that names the class with `_target_` and
sets the keys' defaults; `build_strategy` parses the YAML's values into `Config` and passes the result
to the constructor as `cfg`. A new built-in is those two files and nothing else (docs/new-strategy.md).

The registry answers "which strategies exist" (`python -m epi.strategies` lists them):
- the built-ins: every module of this package is scanned, and a `Strategy` subclass that sets its own
  `name` (the YAML's file name and `name:`) is registered under it, built-ins in name order;
- classes added in this process with `@register(name)`;
- third-party classes that an installed distribution declares in the entry-point group
  `epi.strategies` (`name = "package.module:Class"`). Their names are read without importing
  anything; a class is imported when it is asked for, so a broken plug-in fails only where it is used.

A plug-in package declares its class in its own pyproject.toml,

    [project.entry-points."epi.strategies"]
    headlock = "my_pkg.headlock:HeadLock"

and ships its YAML as my_pkg/conf/strategy/headlock.yaml (`_target_: my_pkg.headlock.HeadLock`,
`name: headlock`, its keys with their defaults; my_pkg/conf/ needs an `__init__.py` to be importable
as a resource). A run puts that folder on Hydra's search path and picks it like a built-in:

    python train.py 'hydra.searchpath=[pkg://my_pkg.conf]' strategy=headlock strategy.module=lm_head

or with `--config-dir path/to/my_pkg/conf` in place of the search path. A plug-in without a YAML gives
its keys' defaults in its `Config` fields instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from epi.components import import_target
from epi.errors import UserError
from epi.schema import parse
from epi.strategies.base import Stage, Strategy

__all__ = ["ENTRY_POINT_GROUP", "Entry", "Registry", "Stage", "Strategy", "build_strategy", "register", "registry"]

ENTRY_POINT_GROUP = "epi.strategies"

BUILTIN_ORIGIN = "epi-sft"  # the distribution of the built-ins, as `Entry.origin` names it

S = TypeVar("S", bound=type[Strategy])

_registered: dict[str, type[Strategy]] = {}


def build_strategy(cfg: DictConfig, *, quiet: bool = False) -> Strategy:
    """The strategy a `strategy` config node names (`_target_`), its keys checked against the class's
    `Config` schema (epi.schema: types, allowed values, ranges, cross-key rules) before anything runs.

    A key this strategy lacks but another built-in has is ignored with a note (`quiet` silences it):
    that is what a sweep across strategies passes, e.g. `-m strategy=none,cpi ++strategy.probe_steps=2`.
    A key no strategy has is still an error.
    """
    target = cfg.get("_target_")
    cls = import_target(target, "strategy")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise UserError(f"strategy._target_={target!r}: is not a subclass of epi.strategies.Strategy")
    if "cfg" not in inspect.signature(cls.__init__).parameters:
        raise UserError(f"strategy._target_={target!r}: its constructor must take `cfg` (the parsed {cls.__name__}.Config); "
                        "a strategy declares its keys as the fields of its Config class, not as constructor keywords")
    name = cfg.get("name", target)
    params = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("_target_", "name")}
    own = {f.name for f in dataclasses.fields(cls.Config)}
    foreign = sorted((set(params) - own) & _builtin_keys())
    if foreign and not quiet:
        print(f"strategy={name} ignores {', '.join(f'strategy.{k}' for k in foreign)} (keys of other strategies)")
    params = {k: v for k, v in params.items() if k not in foreign}
    return cls(parse(params, cls.Config, "strategy", title=f"strategy={name}"))


def _builtin_keys() -> set[str]:
    """Every key of a built-in strategy's schema."""
    return {f.name for entry in _builtins() for f in dataclasses.fields(entry.load().Config)}


def _builtins() -> list[Entry]:
    """The built-ins, found by scanning this package: in each module (not `_private` ones), the `Strategy` subclasses
    defined there that set `name` themselves (a subclass inherits its parent's name, so only its own counts), by name."""
    found = []
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, Strategy) and cls.__module__ == module.__name__ and vars(cls).get("name"):
                found.append(Entry(cls.name, f"{cls.__module__}:{cls.__qualname__}", BUILTIN_ORIGIN, cls))
    return sorted(found, key=lambda e: e.name)


@dataclass(frozen=True)
class Entry:
    """One registered strategy, described without importing it."""

    name: str
    value: str  # "package.module:Class", the entry-point syntax
    origin: str  # the distribution that declares it ("epi-sft" for the built-ins), or "register()"
    cls: type[Strategy] | None = None  # set for built-ins and classes added with `register`, which are already imported

    @property
    def target(self) -> str:
        """What a YAML's `_target_` writes for this class."""
        return self.value.replace(":", ".")

    def load(self) -> type[Strategy]:
        """The class; an import failure or a non-Strategy becomes one line naming the entry point."""
        if self.cls is not None:
            return self.cls
        where = f"strategy {self.name!r} = {self.value} (from {self.origin})"
        try:
            cls = importlib.metadata.EntryPoint(self.name, self.value, ENTRY_POINT_GROUP).load()
        except (ImportError, AttributeError) as e:
            raise UserError(f"{where}: cannot be loaded: {type(e).__name__}: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise UserError(f"{where}: is not a subclass of epi.strategies.Strategy")
        return cls


class Registry(Mapping[str, type[Strategy]]):
    """Strategy name -> class. Read afresh on every access, so a distribution installed (or put on
    sys.path) after start-up is seen; a name claimed by two different classes is an error."""

    def entries(self) -> dict[str, Entry]:
        """Every strategy by name: built-ins first, then `register`ed classes, then entry points by name."""
        found = _builtins()
        found += [Entry(name, f"{cls.__module__}:{cls.__qualname__}", "register()", cls) for name, cls in _registered.items()]
        found += sorted((_from_entry_point(ep) for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)), key=lambda e: e.name)
        by_name: dict[str, Entry] = {}
        for entry in found:
            first = by_name.setdefault(entry.name, entry)
            if first.value != entry.value:
                raise UserError(
                    f"strategy name {entry.name!r} is claimed twice: {first.value} (from {first.origin}) and "
                    f"{entry.value} (from {entry.origin}); rename or uninstall one"
                )
        return by_name

    def __getitem__(self, name: str) -> type[Strategy]:
        return self.entries()[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.entries())


registry = Registry()


def _from_entry_point(ep: importlib.metadata.EntryPoint) -> Entry:
    return Entry(ep.name, ep.value, ep.dist.name if ep.dist is not None else "an unnamed distribution")


def register(name: str) -> Callable[[S], S]:
    """Class decorator adding a strategy under `name` for this process (a notebook, a script, a test);
    an installed package declares an entry point instead, which every process sees."""

    def add(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"register({name!r}): {cls!r} is not a subclass of epi.strategies.Strategy")
        value = f"{cls.__module__}:{cls.__qualname__}"
        taken = registry.entries().get(name)
        if taken is not None and taken.value != value:
            raise ValueError(f"register({name!r}): the name is taken by {taken.value} (from {taken.origin})")
        _registered[name] = cls
        return cls

    return add
