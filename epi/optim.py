"""The masked optimizer step: isolated coordinates do not move, bit for bit.

Zeroing a gradient does not freeze a weight under AdamW (decoupled weight
decay and stale momentum still move it), so the wrapper holds the parameter
VALUES: it copies the isolated values out before the inner step and writes
them back after it. Gradients are only hidden so that frozen coordinates do
not inflate the gradient-clipping norm.

Two readings of "isolating task-critical parameters" (PAPERS.md):
- freeze (`set_masks`): an isolated coordinate is held for every task;
- exclusive (`set_exclusive`): a coordinate critical to task t is updated by t's gradient
  only. Either one backward of the whole batch sums each linear weight's gradient task by task,
  each owned coordinate its owners' terms only (`epi.task_split`, `ownership(tasks)`), or the step
  runs task-homogeneous micro-batches and `begin_task(t)`/`end_task(t)` around t's backward put
  back the gradient of every coordinate t does not own but another task does; either way t's
  contribution never reaches it; and a step whose batch holds none of a
  coordinate's owners holds its value, as a frozen one. Its optimizer state therefore
  integrates its owners' gradients only (zero in the steps it is held).

Coordinates are read and written with `torch.take` and `Tensor.put_` (flat row-major indices, each once): on
CPU they cost a fifth of `index_copy_`/`index_fill_` for the same coordinates (`bench/RESULTS.md`).

Under FSDP (`parallel=fsdp`) parameters, gradients and optimizer state are DTensors: the engine
works on this rank's local shard of each (`epi.sharding.local`), its masks have the local shards'
shapes and its indices point into them, so no rank ever gathers a whole parameter to mask it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from epi.checkpoint import nbytes
from epi.masks import Masks, churn, churn_indices, pack, unpack
from epi.sharding import Shards, local

MOMENT_POLICIES = ("track", "reset")
MAX_EXCLUSIVE_TASKS = 63  # a coordinate's owners are summed as bits of an int64 when the coordinates are set (its sign bit unused)
# State entries that carry momentum, zeroed on release under "reset".
_MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")


def clip_coefficient(total_norm: Tensor | float, max_norm: float) -> Tensor | float:
    """The factor `torch.nn.utils.clip_grad_norm_` scaled the gradients by."""
    coef = max_norm / (total_norm + 1e-6)
    return coef.clamp(max=1.0) if isinstance(coef, Tensor) else min(coef, 1.0)


@dataclass(frozen=True)
class Ownership:
    """One parameter's exclusive coordinates as the tasks of one batch reach them, the tasks taken in the batch's
    order (flat indices; None where empty). A coordinate's gradient is the sum, in that order, of the terms of its
    owners in the batch, and zero when none of them is in it. `epi.task_split` adds the tasks' terms into one running
    sum in place; the sets say where that sum must be mended, so only the owners' terms remain:
    - `zero[j]`: before task j's term (j > 0), the coordinates whose first owner in the batch is task j (the earlier
      tasks' terms there are dropped);
    - `guard[j]`: read before task j's term and written back after it: owned by a task before j and one after j, not
      by j (the partial sum of the owners so far is kept through j's term);
    - `save[j]`: read after task j's term, written back at the end: the coordinates whose last owner in the batch is
      task j, unless j is the last task (after it nothing is added);
    - `absent`: owned by no task of the batch: zero at the end (the step holds them).
    Each owned coordinate is in at most one `zero`, one `save` and `absent` set, so the sets are about the size of
    the owned coordinates, where shielding each task from what it does not own reads and writes each owned coordinate
    once per task that does not own it."""

    zero: list[Tensor | None]
    guard: list[Tensor | None]
    save: list[Tensor | None]
    absent: Tensor | None


class IsolatedOptimizer:
    """Applies the inner optimizer's update only where the mask allows.

    Per step: backward → `hide_isolated_grads()` → clip → `step(clip_coef)` →
    `zero_grad()`. `moments` says what isolated coordinates' optimizer state does:
    "track" keeps integrating their real (clipped) gradients, so a released
    coordinate resumes exactly as if it had been training and AdamW's
    exp_avg_sq stays a valid EMA of g² everywhere; "reset" feeds them zero
    gradients and zeroes their momentum when they are released.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter],
                 moments: str = "track", shards: Shards | None = None) -> None:
        if moments not in MOMENT_POLICIES:
            raise ValueError(f"moments={moments!r} is not valid; expected one of {list(MOMENT_POLICIES)}")
        self.optimizer = optimizer
        self.named_params = dict(named_params)
        self.moments = moments
        self.shards = shards  # parallel=fsdp: where the local shards lie (churn counts are summed over ranks)
        self.index: dict[str, Tensor] = {}  # flat indices of isolated elements, per parameter with any
        # Exclusive isolation, stored once for all tasks: per parameter the flat indices owned by any task, grouped by
        # the set of tasks that owns them (`_exclusive`, ascending within a group) and the groups as runs
        # (`_groups`: owner bits, start, stop; bit k = `_tasks[k]`). 8 bytes per owned coordinate whatever the number
        # of tasks; every per-task or per-batch set (a task's own coordinates, those it must not reach, those a batch
        # holds) is a few runs of it, joined when needed, not cached: no per-step search of the coordinates.
        self._tasks: list[str] = []
        self._exclusive: dict[str, Tensor] = {}
        self._groups: dict[str, list[tuple[int, int, int]]] = {}
        self._task_stash: dict[str, tuple[Tensor, Tensor | None]] = {}  # shielded (indices, grads) between begin_task and end_task
        self._stash: dict[str, Tensor] = {}  # isolated grads, compact, between hide and step
        self._hidden = False

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def masks(self) -> Masks:
        """The isolation as bool masks, rebuilt on demand (it is stored as flat indices)."""
        return self._as_masks(self.index)

    def set_masks(self, masks: Masks) -> dict[str, int]:
        """Replace the isolation; returns churn counts.

        Stored as flat int64 indices: 8·p bytes per parameter (0.08 at p = 1%)
        instead of a 1-byte bool per element, and the hot path gathers only the
        isolated elements. Call between steps, not between hide and step.
        """
        if self._hidden:
            raise RuntimeError("set_masks between hide_isolated_grads and step would mismatch the stashed grads")
        new: Masks = {}
        for name, mask in masks.items():
            mask = self._checked(name, mask)
            if mask.any():
                new[name] = mask
        old_masks = self.masks
        counts = churn(old_masks, new, self.shards)
        if self.moments == "reset":
            for name, old in old_masks.items():
                released = old & ~new[name] if name in new else old
                self._zero_momentum(self.named_params[name], released)
        self.index = {name: mask.reshape(-1).nonzero().squeeze(1) for name, mask in new.items()}
        return counts

    # ---------------------------------------------------------------- exclusive isolation
    @property
    def exclusive(self) -> bool:
        """Whether exclusive isolation is set (for at least one task, possibly with no coordinates yet)."""
        return bool(self._tasks)

    @property
    def exclusive_params(self) -> frozenset[str]:
        """The parameters with any exclusive coordinate."""
        return frozenset(self._exclusive)

    @property
    def owned(self) -> dict[str, dict[str, Tensor]]:
        """Each task's exclusive coordinates as flat indices per parameter (derived: built on each call)."""
        return {task: self._select(lambda bits, bit=1 << k: bits & bit != 0) for k, task in enumerate(self._tasks)}

    @property
    def owner_counts(self) -> dict[str, dict[frozenset[str], int]]:
        """Per parameter, how many exclusive coordinates each set of tasks owns together (the stored runs' lengths)."""
        return {name: {frozenset(t for k, t in enumerate(self._tasks) if bits >> k & 1): stop - start
                       for bits, start, stop in runs} for name, runs in self._groups.items()}

    @property
    def exclusive_masks(self) -> dict[str, Masks]:
        """Each task's exclusive coordinates as bool masks."""
        return {task: self._as_masks(index) for task, index in self.owned.items()}

    def _as_masks(self, index: dict[str, Tensor]) -> Masks:
        """Flat indices per parameter as bool masks of the parameters' shapes."""
        out: Masks = {}
        for name, idx in index.items():
            shard = local(self.named_params[name])
            mask = torch.zeros(shard.numel(), dtype=torch.bool, device=idx.device)
            out[name] = mask.index_fill_(0, idx, True).view(shard.shape)
        return out

    def set_exclusive(self, masks: dict[str, Masks]) -> dict[str, int]:
        """Replace the exclusive coordinates (task -> masks); a coordinate in several tasks' masks is
        updated by each of them. Returns churn counts of their union. Call between steps."""
        if self._hidden or self._task_stash:
            raise RuntimeError("set_exclusive inside a step would mismatch the stashed grads")
        tasks = list(masks)
        if len(tasks) > MAX_EXCLUSIVE_TASKS:
            raise ValueError(f"exclusive isolation sums a bit per task in an int64: at most {MAX_EXCLUSIVE_TASKS} tasks, got {len(tasks)}")
        per_name: dict[str, list[tuple[Tensor, int]]] = {}
        for k, (task, task_masks) in enumerate(masks.items()):
            for name, mask in task_masks.items():
                mask = self._checked(name, mask)
                if mask.any():
                    per_name.setdefault(name, []).append((mask.reshape(-1).nonzero().squeeze(1), 1 << k))
        exclusive, groups = {}, {}
        for name, parts in per_name.items():
            idx = torch.cat([i for i, _ in parts])
            bits = torch.cat([torch.full_like(i, bit) for i, bit in parts])
            unique, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            # each task lists a coordinate once, so summing distinct powers of two is their bitwise or
            owners = torch.zeros_like(unique).scatter_add_(0, inverse, bits)
            owners, order = torch.sort(owners, stable=True)  # stable: ascending indices within each owner set
            exclusive[name] = unique[order]
            sets, sizes = torch.unique_consecutive(owners, return_counts=True)
            stops = sizes.cumsum(0).tolist()
            groups[name] = [(bits, stop - size, stop) for bits, size, stop in zip(sets.tolist(), sizes.tolist(), stops)]
        counts = churn_indices(self._exclusive, exclusive, self.shards)
        self._tasks, self._exclusive, self._groups = tasks, exclusive, groups
        return counts

    def _select(self, keep: Callable[[int], bool]) -> dict[str, Tensor]:
        """Flat indices, per parameter, of the exclusive coordinates whose owner bits satisfy `keep`: the runs of the
        owner sets it keeps, adjacent runs merged, joined in one tensor (a view of the stored indices when one run)."""
        out = {}
        for name, idx in self._exclusive.items():
            joined = _join(idx, [(start, stop) for bits, start, stop in self._groups[name] if keep(bits)])
            if joined is not None:
                out[name] = joined
        return out

    def _owned_by_none_of(self, tasks) -> dict[str, Tensor]:
        """Flat indices, per parameter, of the exclusive coordinates that none of `tasks` owns (all of them when
        none of `tasks` has exclusive isolation)."""
        bit = sum(1 << k for k, task in enumerate(self._tasks) if task in tasks)
        return self._select(lambda bits: bits & bit == 0) if bit else dict(self._exclusive)

    def shielded(self, task: str | None) -> dict[str, Tensor]:
        """Flat indices, per parameter, of the coordinates `task`'s gradient must not reach: owned by another
        task and not by `task` (every owned coordinate, for a task that owns nothing)."""
        return self._owned_by_none_of({task})

    def ownership(self, order: Sequence[str | None]) -> dict[str, Ownership]:
        """For a batch whose tasks' terms are summed in `order`: per parameter with exclusive coordinates, where the
        running sum must be mended (`Ownership`). Each set is the stored runs of a few owner sets, joined."""
        bits = [1 << self._tasks.index(task) if task in self._tasks else 0 for task in order]
        roles: dict[int, tuple[int | None, list[int], int | None] | None] = {}  # per owner set, for this order
        out: dict[str, Ownership] = {}
        for name, idx in self._exclusive.items():
            zero: list[list[tuple[int, int]]] = [[] for _ in order]
            guard: list[list[tuple[int, int]]] = [[] for _ in order]
            save: list[list[tuple[int, int]]] = [[] for _ in order]
            absent: list[tuple[int, int]] = []
            for owners, start, stop in self._groups[name]:
                if owners not in roles:
                    roles[owners] = _roles(owners, bits)
                role = roles[owners]
                if role is None:
                    absent.append((start, stop))
                    continue
                first, between, final = role
                if first is not None:
                    zero[first].append((start, stop))
                for j in between:
                    guard[j].append((start, stop))
                if final is not None:
                    save[final].append((start, stop))
            out[name] = Ownership([_join(idx, spans) for spans in zero], [_join(idx, spans) for spans in guard],
                                  [_join(idx, spans) for spans in save], _join(idx, absent))
        return out

    def begin_task(self, task: str | None) -> None:
        """Before the backward of a micro-batch of `task` alone: remember the gradients its backward must not
        change (coordinates another task owns and `task` does not). No-op without exclusive coordinates."""
        if not self._tasks:
            return
        self._task_stash = {}
        for name, idx in self.shielded(task).items():
            grad = self.named_params[name].grad
            self._task_stash[name] = (idx, None if grad is None else torch.take(local(grad), idx))

    def end_task(self, task: str | None) -> None:
        """After that backward: put those gradients back, so `task`'s contribution never reaches them."""
        if not self._tasks:
            return
        for name, (idx, before) in self._task_stash.items():
            grad = self.named_params[name].grad
            if grad is None:
                continue
            grad = local(grad)
            if before is None:
                zero_at(grad, idx)
            else:
                grad.put_(idx, before)
        self._task_stash = {}

    def _exclusive_held(self, present: frozenset[str]) -> dict[str, Tensor]:
        """Exclusive coordinates none of whose owners is in this step's batch: held like frozen ones."""
        return self._owned_by_none_of(present)

    def isolation_bytes(self) -> int:
        """Bytes of every tensor the engine holds beyond the inner optimizer and the parameters: masks, owned coordinates,
        stashes and anything a later change might cache (counted from the attributes, so none is missed)."""
        return sum(nbytes(value) for key, value in vars(self).items() if key not in ("optimizer", "named_params", "shards"))

    def _checked(self, name: str, mask: Tensor) -> Tensor:
        """`mask` as a bool tensor on its parameter's device, after checking it names a parameter of its shape."""
        if name not in self.named_params:
            raise ValueError(f"mask for unknown parameter {name!r}")
        param = local(self.named_params[name])
        if mask.shape != param.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter (shard) {tuple(param.shape)}")
        return mask.to(device=param.device, dtype=torch.bool)

    def _zero_momentum(self, param: torch.nn.Parameter, released: Tensor) -> None:
        # Only the first moment is zeroed. Zeroing exp_avg_sq too would kick the
        # coordinate: Adam's bias correction uses the per-tensor step count, so a
        # fresh v = (1-β2)·g² is not corrected back up and the first update is
        # lr·(1-β1)/sqrt(1-β2) ≈ 3.2·lr. The kept v is the (decayed) EMA of this
        # coordinate's own g², which keeps the step size at ≲ lr.
        state = self.optimizer.state.get(param, {})
        for key in _MOMENTUM_KEYS:
            value = state.get(key)
            if isinstance(value, Tensor) and value.shape == param.shape:
                local(value).masked_fill_(released, 0)

    def hide_isolated_grads(self) -> None:
        """Zero grads at isolated coordinates; call after backward, before clipping.

        Under "track" a compact copy of them is kept for `step`. Idempotent
        until the next `step`/`zero_grad`.
        """
        if self._hidden:
            return
        for name, idx in self.index.items():
            grad = self.named_params[name].grad
            if grad is None:
                continue
            grad = local(grad)
            if self.moments == "track":
                self._stash[name] = torch.take(grad, idx)
            zero_at(grad, idx)
        self._hidden = True

    @torch.no_grad()
    def step(self, clip_coef: Tensor | float = 1.0, tasks: frozenset[str | None] = frozenset()) -> None:
        """Inner step with isolated values held bit-exactly.

        `clip_coef` is the factor the clipped grads were scaled by (see
        `clip_coefficient`); under "track" the stashed grads get the same.
        `tasks`: the tasks of this step's batch; the exclusive coordinates of
        none of them are held too.
        """
        self.hide_isolated_grads()
        for name, values in self._stash.items():
            local(self.named_params[name].grad).put_(self.index[name], values * clip_coef)
        hold = list(self.index.items())
        if self._tasks:
            hold += list(self._exclusive_held(tasks).items())
        held = [(name, idx, torch.take(local(self.named_params[name]), idx)) for name, idx in hold]
        self.optimizer.step()
        for name, idx, values in held:
            local(self.named_params[name]).put_(idx, values)
        self._stash.clear()
        self._hidden = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._stash.clear()
        self._hidden = False

    def state_dict(self) -> dict:
        """Inner optimizer state, bit-packed masks and the moment policy."""
        return {"optimizer": self.optimizer.state_dict(), "masks": pack(self.masks), "moments": self.moments,
                "exclusive": {task: pack(masks) for task, masks in self.exclusive_masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        """`state` from `state_dict`; without its "optimizer" entry (a sharded checkpoint, whose inner optimizer
        state DCP restores) only the isolation is restored."""
        if state["moments"] != self.moments:
            raise ValueError(f"checkpoint has moments={state['moments']!r}, this optimizer {self.moments!r}")
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self._stash.clear()
        self._hidden = False
        self.index = {}  # masks are restored as they were, no release policy applies
        self.set_masks(unpack(state["masks"]))
        self.set_exclusive({task: unpack(packed) for task, packed in state.get("exclusive", {}).items()})


def zero_at(tensor: Tensor, idx: Tensor) -> None:
    """Zero `tensor` at the flat indices `idx` (each once), in place: `put_`, a fifth of `index_fill_`'s cost on CPU."""
    tensor.put_(idx, tensor.new_zeros(idx.numel()))


def _roles(owners: int, bits: list[int]) -> tuple[int | None, list[int], int | None] | None:
    """Where a coordinate owned by the tasks `owners` (bits) is mended in a batch of the tasks `bits`, in order: the
    task before whose term it is zeroed, those through whose terms it is guarded, the task after whose term it is saved
    (None: not needed); None when no owner is in the batch."""
    at = [j for j, bit in enumerate(bits) if bit & owners]
    if not at:
        return None
    between = [j for j in range(at[0] + 1, at[-1]) if j not in at]
    return (at[0] if at[0] > 0 else None), between, (at[-1] if at[-1] < len(bits) - 1 else None)


def _join(idx: Tensor, spans: list[tuple[int, int]]) -> Tensor | None:
    """The slices `spans` (ascending) of `idx` as one tensor, adjacent ones merged (a view when that leaves one
    slice; None when none)."""
    merged: list[list[int]] = []
    for start, stop in spans:
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    if not merged:
        return None
    return idx[merged[0][0]:merged[0][1]] if len(merged) == 1 else torch.cat([idx[a:b] for a, b in merged])
