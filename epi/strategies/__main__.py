"""`python -m epi.strategies`: every strategy the registry knows, with a one-line description, its
`_target_`, and its config keys with their defaults.

The keys are those a run gets: the strategy's YAML composed as train.py composes it, from the
checkout's conf/strategy/<name>.yaml or, for a plug-in, from `<its top-level package>/conf/
strategy/<name>.yaml` put on Hydra's search path. A strategy without a YAML lists the fields of its
`Config` instead: a field's default where it has one, else its type and rules. A plug-in that fails
to load is reported on its row and the exit status is 2; the other rows still print.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from epi.errors import UserError
from epi.schema import keys as schema_keys
from epi.strategies import Entry, Strategy, registry

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
WIDTH = 100


def description(cls: type[Strategy]) -> str:
    """First line of the class's own docstring, else of its module's, without the "`strategy=x`: "
    prefix the modules start with (the name is already in its own column)."""
    doc = (cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or "").strip()
    first = re.sub(r"^`strategy=[\w.-]+`:\s*", "", doc.splitlines()[0]) if doc else ""
    return first[:1].upper() + first[1:]


def plugin_searchpath(entry: Entry) -> str | None:
    """`pkg://<package>.conf` when the class's top-level package ships conf/strategy/<name>.yaml."""
    package = entry.value.split(":")[0].split(".")[0]
    if package == "epi" or not hasattr(sys.modules.get(package), "__path__"):  # the checkout's conf/, or a lone module
        return None
    yaml = importlib.resources.files(package) / "conf" / "strategy" / f"{entry.name}.yaml"
    return f"pkg://{package}.conf" if yaml.is_file() else None


def composed_keys(name: str, searchpath: str | None) -> dict[str, Any]:
    """The `strategy` node of the training config composed with `strategy=<name>`, flattened."""
    overrides = [f"strategy={name}", *([f"hydra.searchpath=[{searchpath}]"] if searchpath else [])]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        node = OmegaConf.to_container(compose("config", overrides=overrides).strategy, resolve=True)
    return {k: v for k, v in flatten(node) if k not in ("_target_", "name")}


def flatten(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def schema_defaults(cls: type[Strategy]) -> dict[str, Any]:
    """The keys of the class's `Config`: a field's default where it has one (a plug-in without a YAML gives its
    defaults there), else `<type (rules)>` (a built-in's schema holds no defaults: its YAML does)."""
    shown = dict(schema_keys(cls.Config))
    return {
        f.name: f.default if f.default is not dataclasses.MISSING
        else f.default_factory() if f.default_factory is not dataclasses.MISSING else f"<{shown[f.name]}>"
        for f in dataclasses.fields(cls.Config)
    }


def config_keys(entry: Entry, cls: type[Strategy]) -> dict[str, Any]:
    """The YAML's keys where there is one (checkout or plug-in), else the `Config`'s."""
    searchpath = plugin_searchpath(entry)
    if searchpath or (CONF_DIR / "strategy" / f"{entry.name}.yaml").is_file():
        return composed_keys(entry.name, searchpath)
    return schema_defaults(cls)


def show(value: Any) -> str:
    """YAML spelling of a default (null, true), as a user writes it in an override."""
    return value if isinstance(value, str) else json.dumps(value)


def block(entry: Entry, indent: int) -> str:
    """One strategy: name and description, then its `_target_`, then its keys wrapped."""
    cls = entry.load()
    keys = " ".join(f"{k}={show(v)}" for k, v in config_keys(entry, cls).items()) or "(no keys)"
    pad = " " * indent
    lines = textwrap.wrap(description(cls) or "-", WIDTH, initial_indent=f"{entry.name:<{indent}}", subsequent_indent=pad)
    lines.append(f"{pad}_target_: {entry.target}  (from {entry.origin})")
    lines += textwrap.wrap(keys, WIDTH, initial_indent=pad, subsequent_indent=pad, break_on_hyphens=False)
    return "\n".join(lines)


def main() -> int:
    try:
        entries = registry.entries()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    indent = max(len("strategy"), *map(len, entries)) + 2
    blocks, status = [], 0
    for entry in entries.values():
        try:
            blocks.append(block(entry, indent))
        except UserError as e:
            blocks.append(f"{entry.name:<{indent}}error: {e}")
            status = e.exit_code
    print(f"{'strategy':<{indent}}description / _target_ / keys=defaults\n")
    print("\n\n".join(blocks))
    return status


if __name__ == "__main__":
    sys.exit(main())
