"""Components built from config nodes (`_target_`, optional `_partial_`), keys checked against the target first.

`hydra.utils.instantiate` would pass a misspelt key on and fail inside the target with a
traceback; here it is one line naming the node, the key and the keys the target takes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from epi.errors import UserError


def accepted_keys(target: Any) -> set[str] | None:
    """Keywords `target` takes; None when it takes any. A class's __init__ that passes **kwargs up adds its
    parents' keywords (walked along the MRO until an __init__ without **kwargs)."""
    functions = [k.__init__ for k in target.__mro__ if "__init__" in vars(k)] if inspect.isclass(target) else [target]
    keys: set[str] = set()
    for fn in functions:
        params = inspect.signature(fn).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return keys
    return None if not inspect.isclass(target) else keys


def import_target(name: str, key: str) -> Any:
    """What a `_target_` names; an import failure of any kind is one line naming the node."""
    try:
        return get_object(name)
    except Exception as e:  # noqa: BLE001 - whatever the import raised, the name is the user's to fix
        raise UserError(f"{key}._target_={name!r}: cannot be imported ({type(e).__name__}: {e})") from e


def check_keys(node: DictConfig, key: str) -> None:
    """The node's target imports and takes every key the node gives (what `build` checks first)."""
    _resolve(node, key)


def build(node: DictConfig, key: str, **given: Any) -> Any:
    """The object (or, with `_partial_: true`, the partial) a config node describes; `given` are
    arguments the caller adds (e.g. the run directory of a logger)."""
    target, params, partial = _resolve(node, key, tuple(given))
    if partial:
        return functools.partial(target, **params, **given)
    return target(**params, **given)


def _resolve(node: DictConfig, key: str, given: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any], bool]:
    """(target, its keyword arguments from the node, whether partial), or one UserError line."""
    params = OmegaConf.to_container(node, resolve=True)
    target_name = params.pop("_target_", None)
    if target_name is None:
        raise UserError(f"{key}: no _target_ naming what to build")
    partial = params.pop("_partial_", False)
    target = import_target(target_name, key)
    valid = accepted_keys(target)
    unknown = sorted(set(params) - valid) if valid is not None else []
    if unknown:
        raise UserError(f"{key}: unknown key(s) {unknown} for {target_name}; valid keys: {sorted(valid - set(given))}")
    return target, params, partial
