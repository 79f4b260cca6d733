"""Fully sharded data parallel (`parallel=fsdp`): PyTorch's FSDP2 (`fully_shard`) and what isolation needs on shards.

Under FSDP2 every parameter is a DTensor split on dim 0: rank r holds rows [r·c, (r+1)·c) with
c = ceil(rows / world), as `torch.chunk` cuts them. The isolation engine works on those local shards
only (flat indices into the local tensor; no rank ever materialises a full parameter to mask it),
and a strategy sees each parameter, gradient and optimizer state as its local shard. What has to be
global is computed by the collectives here: `Shards.sum`/`max` for counts, layer means and maxima,
and `Shards.gather` for the values that decide a top-p threshold, so a sharded run selects exactly
the coordinates an unsharded run would select from the same importance (`epi.masks.top_p`).

Training runs through the root module (the loss, `epi.loss.CausalLMLoss`): FSDP2 initialises its
state at the root's first forward, so `shard` runs one token-free forward right away; evaluation,
generation and perplexity call the model's own forward inside `unsharded_root`, which all-gathers the
root's parameters (embeddings, final norm, LM head) that no decoder layer owns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

PARALLEL = ("ddp", "fsdp")  # parallel.name
MIXED_PRECISION = ("none", "bf16")  # parallel.mixed_precision: bf16 parameters in forward/backward, fp32 reduction


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: writing into it writes the parameter), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class Shards:
    """Where this rank's shard of each parameter lies in the flattened whole, and the collectives over ranks.

    `numel[name]`: the whole parameter's element count; `start[name]`: the flat offset of this rank's first
    element; `size[name]`: its element count here (possibly 0 for a parameter with fewer rows than ranks).
    """

    rank: int
    world: int
    numel: dict[str, int]
    start: dict[str, int]
    size: dict[str, int]

    @classmethod
    def of(cls, named_params: dict[str, torch.nn.Parameter]) -> Shards:
        rank, world = dist.get_rank(), dist.get_world_size()
        numel, start, size = {}, {}, {}
        for name, param in named_params.items():
            shard = local(param)
            rows = param.shape[0] if param.dim() else 1
            chunk = math.ceil(rows / world)
            first_row = min(rank * chunk, rows)
            row_size = param.numel() // rows if rows else 0
            numel[name], start[name], size[name] = param.numel(), first_row * row_size, shard.numel()
            expected = max(0, min(chunk, rows - first_row)) * row_size
            if size[name] != expected:
                raise RuntimeError(f"{name}: local shard of {size[name]} elements, dim-0 chunking gives {expected}")
        return cls(rank, world, numel, start, size)

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over ranks (a copy; the input is left alone)."""
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def max(self, values: Tensor) -> Tensor:
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def gather(self, values: Tensor) -> Tensor:
        """The 1-D tensors of every rank, concatenated in rank order (lengths may differ)."""
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([values.numel()]))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=values.dtype)
        padded[: values.numel()] = values.cpu()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(n.item())] for part, n in zip(parts, sizes)])


def grad_norm(params: list[torch.nn.Parameter]) -> Tensor:
    """The 2-norm of all gradients (the clipping norm). Under FSDP each rank's norm covers its shards: the DTensor
    result combines them over ranks, so every rank clips by the unsharded run's norm."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one: the modules Hugging Face marks as not to be split (`_no_split_modules`:
    the decoder layer classes), else the decoder's `layers`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = list(getattr(model.get_decoder(), "layers", []))
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (no _no_split_modules, no decoder.layers)")
    return layers


def shard(root: torch.nn.Module, model: torch.nn.Module, mixed_precision: str = "none", cpu_offload: bool = False,
          reshard_after_forward: bool = True) -> None:
    """`fully_shard` every decoder layer of `model`, then `root` (the loss module holding the model), in place.

    The parameters become DTensors: build the optimizer (and read `named_parameters`) after this.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision={mixed_precision!r} is not one of {list(MIXED_PRECISION)}")
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)


@contextmanager
def unsharded_root(root: torch.nn.Module | None) -> Iterator[None]:
    """The root's own parameters all-gathered, so the model's forward and `generate` can run outside the root's
    forward (decoder layers gather theirs in their own hooks). Every rank must enter it together. No-op for None."""
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on CPU, on rank 0 (empty elsewhere): for the Hugging Face export.
    Every rank must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
