"""Per-task weight gradients from one backward of a mixed batch (`isolation.task_split=rows`).

Exclusive isolation (`strategy.mode=exclusive`, `epi/optim.py`) needs, for every coordinate another
task owns, the gradient without the current task's contribution. The reference way runs the batch as
task-homogeneous micro-batches and puts the shielded gradients back after each task's backward
(`task_split=micro_batches`): correct, but on a small batch each micro-batch of one or two examples
costs nearly a whole batch (SmolLM2 at batch 8: 1.35x a step of `none`).

The gradient of a linear weight is a sum over token rows, dW = Σ_tokens dYᵀ·X, and the examples of a batch are
independent (no token attends to another example's), so the backward of the whole batch already holds every
task's dY and X. Here each linear layer whose weight has exclusive coordinates runs its forward with the weight
detached (autograd still computes dX through it, but not dW), keeps X, and when dY arrives sums
dYᵀ·X task by task over the task's tokens, each exclusive coordinate its owners' terms only (the engine's
`ownership`), then adds the result to the weight's `.grad`. A task's tokens are rows of the layer's input with
its batch and sequence dimensions flattened: whole padded rows (a slice, no copy) or, under `data.packing`, the
spans its examples fill in rows that mix tasks (the rows gathered task by task, once per layer). The same
products as one weight gradient (the rows are split, not repeated), one forward and one backward of the whole
batch, and the result equals the micro-batch path's to float rounding (the sums run in another order;
`tests/test_exclusive.py`).

It runs where that reasoning holds: one process (DDP and FSDP reduce gradients in autograd hooks that
a hand-written `.grad` would bypass), eager (no `schedule.compile`), no activation checkpointing (its
recompute would run the forward twice), and every exclusive coordinate in the weight or bias of a plain
`nn.Linear` whose input holds the batch's tokens (the default `include` isolates nothing else; an LM
head under `schedule.lm_head=trained` sees the trained positions instead). Otherwise `rows_unavailable` says why and the
trainer runs micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from epi.optim import Ownership, zero_at

TASK_SPLITS = ("rows", "micro_batches")  # isolation.task_split

Layers = dict[nn.Linear, dict[str, str]]  # a plain nn.Linear -> {"weight" | "bias": its parameter's name}


@dataclass(frozen=True)
class RowSplit:
    """How one micro-batch's backward is split: the layers whose gradients are summed per task, and each task's
    tokens, tasks in summation order. Every layer's input (and its output's gradient) is flattened to `count` rows
    of (tokens, features); with `order` (an index tensor on the batch's device) its rows are first gathered in that
    order, once per layer, so that each task's tokens are the slice `tokens[task]` of them (packed rows, which mix
    tasks); without it they are slices of the flattened rows themselves (padded rows ordered by task: no copy)."""

    layers: Layers
    tokens: dict[str, slice]
    count: int
    order: Tensor | None = None


def linear_layers(model: nn.Module, names: set[str]) -> Layers:
    """The plain nn.Linear modules whose weight or bias is one of `names`, with those names."""
    out: Layers = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            continue
        for attr in ("weight", "bias"):
            name = f"{prefix}.{attr}" if prefix else attr
            if name in names and getattr(module, attr) is not None:
                out.setdefault(module, {})[attr] = name
    return out


def rows_unavailable(model: nn.Module, owned: set[str], world: int, compiled: bool, checkpointing: bool,
                     lm_head: str = "trained") -> str | None:
    """Why `task_split=rows` cannot run for exclusive coordinates in the parameters `owned`; None if it can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {f"{prefix}.{attr}" for prefix, module in model.named_modules() if module is head and head is not None
                  for attr in ("weight", "bias")}
    if world > 1:
        return "it runs on one process (DDP/FSDP reduce gradients in hooks a hand-written gradient would bypass)"
    if compiled:
        return "schedule.compile=true (the split forward is eager)"
    if checkpointing:
        return "model.gradient_checkpointing=true (its recompute would run the split forward twice)"
    if lm_head == "trained" and owned & head_names:
        return "schedule.lm_head=trained runs the LM head on the trained positions, not on the batch's rows"
    covered = {name for attrs in linear_layers(model, owned).values() for name in attrs.values()}
    outside = sorted(owned - covered)
    if outside:
        return f"{len(outside)} parameter(s) with exclusive coordinates are not a plain nn.Linear's weight or bias ({outside[0]}, ...)"
    return None


@contextmanager
def split_by_rows(split: RowSplit, ownership: dict[str, Ownership]) -> Iterator[None]:
    """Within the block, a forward and backward of one batch leaves in `.grad` of each parameter of
    `split.layers` the sum over tasks of that task's gradient (from its tokens `split.tokens[task]`), each
    exclusive coordinate its owners' terms only: `ownership[name]` is the engine's `ownership(list(split.tokens))`.
    Every other parameter's gradient is autograd's, unchanged."""
    try:
        for module, attrs in split.layers.items():
            module.forward = _split_forward(module, attrs, ownership, split)  # an instance attribute shadows nn.Linear.forward
        yield
    finally:
        for module in split.layers:
            vars(module).pop("forward", None)


def _split_forward(module: nn.Linear, attrs: dict[str, str], ownership: dict[str, Ownership], split: RowSplit):
    def forward(x: Tensor) -> Tensor:
        weight, bias = module.weight, module.bias
        y = nn.functional.linear(x, weight.detach() if "weight" in attrs else weight,
                                 bias.detach() if "bias" in attrs else bias)
        if torch.is_grad_enabled():
            saved = x.detach()
            y.register_hook(lambda dy: _accumulate(module, attrs, saved, dy, ownership, split))
        return y

    return forward


@torch.no_grad()
def _accumulate(module: nn.Linear, attrs: dict[str, str], x: Tensor, dy: Tensor,
                ownership: dict[str, Ownership], split: RowSplit) -> None:
    """dW (and db) summed task by task over each task's tokens, each exclusive coordinate its owners' terms only.

    The terms go into one running sum in place (`addmm_`: no weight-sized temporary and extra add per task), which is
    mended at the owned coordinates only where `Ownership` says: zeroed before a coordinate's first owner in the batch,
    kept through a task between two of its owners, and its owners' sum saved after the last of them and written back at
    the end. The sums run in the same order as with each task's term shielded from what it does not own, so the result
    is the same, bit for bit, at about a third of the coordinates read and written. Read and written with `take` and
    `put_` (flat indices, each once): on CPU `index_copy_` and `index_fill_` cost 4-5x as much (`bench/RESULTS.md`)."""
    flat_dy, flat_x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    if flat_x.shape[0] != split.count:
        raise RuntimeError(f"task_split=rows: a linear layer's input holds {flat_x.shape[0]} tokens, not the batch's {split.count}")
    if split.order is not None:  # one gather each (`index_select`: on CPU a third to a half of what advanced indexing costs)
        flat_dy, flat_x = flat_dy.index_select(0, split.order), flat_x.index_select(0, split.order)
    totals: dict[str, Tensor] = {}
    saved: list[tuple[Tensor, Tensor, Tensor]] = []  # (running sum, coordinates, their owners' sum)
    for j, tokens in enumerate(split.tokens.values()):
        rows_dy = flat_dy[tokens]
        rows_x = flat_x[tokens].to(dy.dtype)  # under autocast: the bf16 input the product used

        def term(attr: str) -> Tensor:  # this task's gradient of `attr`, in the parameter's dtype
            value = rows_dy.t().mm(rows_x) if attr == "weight" else rows_dy.sum(0)
            return value.to(getattr(module, attr).dtype)

        for attr, name in attrs.items():
            sets = ownership.get(name)
            total = totals.get(attr)
            if total is None:  # the first task's term starts the sum: nothing to mend before it
                totals[attr] = total = term(attr)
            else:
                zero, guard = (sets.zero[j], sets.guard[j]) if sets else (None, None)
                if zero is not None:
                    zero_at(total, zero)
                kept = torch.take(total, guard) if guard is not None else None
                if attr == "weight" and total.dtype == dy.dtype:
                    total.addmm_(rows_dy.t(), rows_x)
                else:
                    total.add_(term(attr))
                if kept is not None:
                    total.put_(guard, kept)
            if sets and sets.save[j] is not None:
                saved.append((total, sets.save[j], torch.take(total, sets.save[j])))
    for total, idx, values in saved:
        total.put_(idx, values)
    for attr, total in totals.items():
        sets = ownership.get(attrs[attr])
        if sets and sets.absent is not None:
            zero_at(total, sets.absent)
        param = getattr(module, attr)
        param.grad = total if param.grad is None else param.grad.add_(total)
