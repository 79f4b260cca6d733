"""What a run holds in memory on each rank, by kind: counted from a live trainer (`state_bytes`), and predicted
before anything is allocated from the parameters' shapes and the config (`Shapes`, `optimizer_layout`), which
`python -m epi.plan` prints and tests/test_plan.py holds to the byte against `state_bytes`.

Bytes are `numel * element_size` of the tensors themselves: what the allocator is asked for, not its rounding or
caching. Under `parallel=fsdp` every count is this rank's shards (`epi.sharding.local`); FSDP2 cuts dim 0 as
`torch.chunk` does, so rank r holds rows [r*c, (r+1)*c) with c = ceil(rows / world), and rank 0 the most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from epi.components import build
from epi.errors import UserError
from epi.sharding import local
from epi.step import param_groups

if TYPE_CHECKING:
    from epi.trainer import Trainer

# Optimizer keys that choose how the state is updated (one kernel, grouped tensors), not what it holds.
HOW_NOT_WHAT = ("fused", "foreach", "capturable", "differentiable")


@dataclass(frozen=True)
class StateBytes:
    """Bytes a rank holds between steps, by kind; `isolation_host` is what strategies keep in host memory (CPI's
    cores, a first mask) while the model is on a GPU (on a CPU run everything is `isolation_device`)."""

    params: int
    grads: int
    optimizer: int
    isolation_device: int
    isolation_host: int

    @property
    def isolation(self) -> int:
        return self.isolation_device + self.isolation_host


def _key(t: Tensor) -> tuple[int, int, int]:
    """The memory a tensor views: its storage, offset and length (two views of the same elements count once)."""
    return t.untyped_storage()._cdata, t.storage_offset(), t.numel()


def tensors(value: Any) -> list[Tensor]:
    """Every tensor inside nested dicts, lists and tuples (as local shards: a DTensor's part on this rank)."""
    if isinstance(value, Tensor):
        return [local(value)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def _sum(found: list[Tensor], seen: set[tuple[int, int, int]]) -> int:
    """Bytes of the tensors not seen before (adding them to `seen`)."""
    total = 0
    for t in found:
        key = _key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def state_bytes(trainer: Trainer) -> StateBytes:
    """What this rank of a live run holds now, counted from the tensors themselves: the model's parameters, their
    gradients, the inner optimizer's state, and every tensor the isolation engine and the strategy keep (found in
    their attributes, so a buffer a later change adds is counted too; a strategy's references to the parameters are
    not counted twice). Between hide and step the engine's stash of gradients counts too."""
    model, engine, strategy = trainer.model, trainer.optimizer, trainer.strategy
    seen: set[tuple[int, int, int]] = set()
    params = _sum([local(p) for p in model.parameters()], seen)
    grads = _sum([local(p.grad) for p in model.parameters() if p.grad is not None], seen)
    optimizer = _sum(tensors(list(engine.optimizer.state.values())), seen)
    own = {k: v for k, v in vars(engine).items() if k not in ("optimizer", "named_params", "shards")}
    own.update({f"strategy.{k}": v for k, v in vars(strategy).items() if k not in ("ctx", "cfg")})
    device = next(model.parameters()).device.type
    held = tensors(own)
    on_device = _sum([t for t in held if t.device.type == device], seen)
    on_host = _sum([t for t in held if t.device.type != device], seen)
    return StateBytes(params, grads, optimizer, on_device, on_host)


# ---------------------------------------------------------------- predicted from shapes
def shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard on `rank`, as FSDP2 (torch.chunk) cuts them: ceil(rows/world) each, the last ranks fewer or none."""
    chunk = math.ceil(rows / world)
    return max(0, min(chunk, rows - rank * chunk))


@dataclass(frozen=True)
class Shapes:
    """The model's parameters as one rank holds them: unsharded (`world` 1) or FSDP2's dim-0 shards of `rank`.

    `params`: every parameter by name, in model order (fake tensors will do: only shapes and dtypes are read);
    `trainable`: the names the optimizer steps (requires_grad), as the stepper collects them."""

    params: dict[str, Tensor]
    world: int = 1
    rank: int = 0

    @classmethod
    def of(cls, model: torch.nn.Module, world: int = 1, rank: int = 0) -> Shapes:
        return cls(dict(model.named_parameters()), world, rank)

    @property
    def trainable(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.params.items() if p.requires_grad}

    def local(self, name: str) -> int:
        """Elements of parameter `name` on this rank."""
        p = self.params[name]
        if self.world == 1 or p.dim() == 0:
            return p.numel()
        return shard_rows(p.shape[0], self.world, self.rank) * (p.numel() // p.shape[0])

    def local_sum(self, names: Any) -> int:
        return sum(self.local(n) for n in names)

    def bytes(self, names: Any, element_size: int | None = None) -> int:
        """Bytes of the named parameters on this rank, at their own element size or at `element_size`."""
        return sum(self.local(n) * (element_size or self.params[n].element_size()) for n in names)


@dataclass(frozen=True)
class OptimizerLayout:
    """What the configured optimizer keeps per parameter: state keys shaped like the parameter (bytes per element,
    e.g. AdamW's exp_avg and exp_avg_sq at 4 each in fp32) and fixed-size ones (bytes per parameter tensor, e.g. its
    step count)."""

    name: str
    per_element: dict[str, int]
    per_tensor: dict[str, int]

    def bytes(self, shapes: Shapes) -> int:
        trainable = shapes.trainable
        return (sum(self.per_element.values()) * shapes.local_sum(trainable)
                + sum(self.per_tensor.values()) * len(trainable))

    def describe(self) -> str:
        keys = [f"{k} ({b} B/element)" for k, b in self.per_element.items()] + [f"{k} ({b} B)" for k, b in self.per_tensor.items()]
        return f"{self.name}: {', '.join(keys) or 'no state'}"


def optimizer_layout(node: DictConfig, dtype: torch.dtype, weight_decay: float) -> OptimizerLayout:
    """The configured optimizer's state, found by one step of it on two small CPU parameters of `dtype` (a matrix
    and a vector, in the stepper's parameter groups): any torch.optim class, or the user's own, is read as it is,
    not from a table. `fused`, `foreach` and the like are left out of this step: they choose the kernel, not what
    the state holds (and a fused kernel may not exist on this machine's CPU for the target's dtype)."""
    values = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in HOW_NOT_WHAT}
    matrix = torch.nn.Parameter(torch.ones(3, 5, dtype=dtype))
    vector = torch.nn.Parameter(torch.ones(5, dtype=dtype))
    named = {"matrix": matrix, "vector": vector}
    try:
        make = build(OmegaConf.create(values), "optimizer")
        optimizer = make(param_groups(named, weight_decay))
        for p in named.values():
            p.grad = torch.full_like(p, 0.5)
        optimizer.step()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the optimizer raised, the plan cannot size it
        raise UserError(f"optimizer._target_={node.get('_target_')!r}: one step on two small CPU parameters (to size its "
                        f"state) failed: {type(e).__name__}: {e}") from e
    per_element: dict[str, int] = {}
    per_tensor: dict[str, int] = {}
    for p in named.values():
        for key, value in optimizer.state[p].items():
            if isinstance(value, Tensor) and value.shape == p.shape:
                per_element[key] = value.element_size()
            elif isinstance(value, Tensor):
                per_tensor[key] = value.numel() * value.element_size()
    return OptimizerLayout(type(optimizer).__name__, per_element, per_tensor)
