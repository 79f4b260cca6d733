"""Isolation strategies. Each YAML in conf/strategy/ names its class with `_target_`."""

from __future__ import annotations

import inspect

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from epi.errors import UserError
from epi.strategies.base import Stage, Strategy

__all__ = ["Stage", "Strategy", "build_strategy"]


def build_strategy(cfg: DictConfig) -> Strategy:
    params = OmegaConf.to_container(cfg, resolve=True)
    target = params.pop("_target_")
    name = params.pop("name", target)
    cls = get_class(target)
    valid = _keys(cls)
    unknown = sorted(set(params) - valid)
    if unknown:
        raise UserError(f"strategy={name}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    return cls(**params)


def _keys(cls: type) -> set[str]:
    """Constructor keywords along the class hierarchy (subclasses pass **kwargs up)."""
    keys: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            keys |= {p.name for p in inspect.signature(klass.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY or p.kind == p.POSITIONAL_OR_KEYWORD} - {"self"}
    return keys
