"""The typed config layer: a dataclass per config node says what each key may hold, checked in one pass.

Defaults live in the YAML files under conf/ (what Hydra composes and a researcher overrides);
a schema dataclass holds no defaults, only the type of each key (`int`, `float`, `bool`, `str`,
`Literal[...]` for a choice, `X | None`, `list[X]`, `dict[str, X]`, a nested schema) and, through
`Annotated[T, Rule(...)]`, the range or rule it must meet. `parse` turns a composed node into the
dataclass or raises one `UserError` line, `key=value: rule`, naming the first key that is wrong;
cross-key rules live in a schema's `check` method. OmegaConf's own structured configs cannot say
`Literal` (omegaconf 2.3), hence this layer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from omegaconf import DictConfig, OmegaConf

from epi.errors import UserError


@dataclass(frozen=True)
class Rule:
    """A condition on a key's value and the sentence that states it (after `key=value: `)."""

    ok: Callable[[Any], bool]
    says: str


def positive(example: str = "") -> Rule:
    return Rule(lambda v: v > 0, "must be > 0" + (f" (e.g. {example})" if example else ""))


def at_least(low: float, why: str = "") -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low}" + (f" ({why})" if why else ""))


def within(low: float, high: float, *, open_low: bool = False, open_high: bool = False, why: str = "") -> Rule:
    """low <= v <= high, either end open."""
    shown = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return Rule(
        lambda v: (v > low if open_low else v >= low) and (v < high if open_high else v <= high),
        f"must be in {shown}" + (f", {why}" if why else ""),
    )


class Schema:
    """Base of the config dataclasses: `check` holds the rules that involve more than one key."""

    def check(self, key: str) -> None:
        """Cross-key rules; raise `fail(...)`. `key` is this node's path (e.g. "strategy")."""


def fail(key: str, value: Any, rule: str) -> UserError:
    return UserError(f"{key}={value!r}: {rule}")


def parse(node: DictConfig | dict | None, schema: type[Schema], key: str, *, ignore: tuple[str, ...] = (),
          title: str | None = None) -> Any:
    """`node` as an instance of `schema`, every key checked; `ignore` lists keys that are not the schema's
    business (e.g. `_target_`); `title` names the node in key-set errors (e.g. "strategy=epi")."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    for name in ignore:
        values.pop(name, None)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema, include_extras=True)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{title or key}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    optional = {n for n, f in fields.items() if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    missing = sorted(set(fields) - set(values) - optional)
    if missing:
        raise UserError(f"{title or key}: missing key(s) {missing} (the config file of this group sets them)")
    parsed = {name: _value(value, hints[name], f"{key}.{name}") for name, value in values.items()}
    instance = schema(**parsed)
    instance.check(key)
    return instance


def _value(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the type `hint` (with its rules), converted where the type says (int -> float)."""
    rules: tuple[Rule, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        rules = tuple(x for x in extras if isinstance(x, Rule))
    typed = _typed(value, hint, key)
    for rule in rules:
        if typed is not None and not rule.ok(typed):
            raise fail(key, value, rule.says)  # the value as the user wrote it
    return typed


def _typed(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _value(value, inner[0], key)
        for option in inner:  # e.g. str | list[str]: the first that takes the value
            try:
                return _value(value, option, key)
            except UserError:
                continue
        raise fail(key, value, f"must be {' or '.join(_describe(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise fail(key, value, f"must be one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise fail(key, value, f"must be a list of {_describe(args[0])}")
        return [_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(key, value, f"must be a mapping of {_describe(args[1])}")
        return {k: _value(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Schema):
        return parse(value, hint, key)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise fail(key, value, "must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(key, value, "must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(key, value, "must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail(key, value, "must be a string")
        return value
    raise TypeError(f"{key}: the schema type {hint!r} is not supported by epi.schema")


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def keys(schema: type[Schema]) -> list[tuple[str, str]]:
    """(key, type as written) for each key of a schema: what `python -m epi.strategies` lists."""
    hints = typing.get_type_hints(schema, include_extras=True)
    return [(f.name, _shown(hints[f.name])) for f in dataclasses.fields(schema)]


def _shown(hint: Any) -> str:
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        rules = "; ".join(x.says for x in extras if isinstance(x, Rule))
        return _shown(hint) + (f" ({rules})" if rules else "")
    if typing.get_origin(hint) is Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")
