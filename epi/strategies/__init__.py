"""Isolation strategies. Each YAML in conf/strategy/ names its class with `_target_`."""

from __future__ import annotations

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
    try:
        return cls(**params)
    except TypeError as e:  # unknown or missing key
        raise UserError(f"strategy={name}: {e}. Valid keys are those of conf/strategy/{name}.yaml.") from e
