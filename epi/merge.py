"""Model merging for CPI-FT's fuse step: SLERP, linear interpolation and core transplant.

Each merge method is a small pure function over tensors (mergekit style). SLERP
treats a whole tensor as one flat vector. All arithmetic runs in float64, so
the near-colinear test (1 - |cos| < eps) is meaningful for eps far below
float32 resolution, and interpolation endpoints (t = 0, t = 1) come out exact.

Under `parallel=fsdp` each rank holds dim-0 shards of every tensor: `reduce` (a sum over ranks)
makes SLERP's whole-tensor norms and dot product those of the whole tensors, so every rank
takes the unsharded fusion's path and angle and fuses its shard as the unsharded run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over ranks (parallel=fsdp); None: one process

SPACES = ("task_vector", "weight")
PATHS = ("slerp", "linear", "zero")


def lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """(1 - t)·a + t·b in float64, returned in a's dtype.

    Written as a weighted sum rather than a + t·(b - a) so that t = 0 gives a
    and t = 1 gives b exactly.
    """
    out = (1.0 - t) * a.double() + t * b.double()
    return out.to(a.dtype)


def _norms_and_dot(a64: Tensor, b64: Tensor, reduce: Reduce | None) -> tuple[float, float, float]:
    """|a|, |b| and <a, b> of the whole tensors (summed over ranks' shards when `reduce` is given)."""
    if reduce is None:
        return a64.norm().item(), b64.norm().item(), (a64.flatten() @ b64.flatten()).item()
    sums = reduce(torch.stack([a64.square().sum(), b64.square().sum(), a64.flatten() @ b64.flatten()]).cpu()).tolist()
    return math.sqrt(sums[0]), math.sqrt(sums[1]), sums[2]


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 1e-8, reduce: Reduce | None = None) -> tuple[Tensor, str]:
    """Spherical interpolation of a and b as flat vectors; returns (result, path).

    result = sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b with cos θ = <a,b>/(|a||b|),
    applied to the raw vectors, so norms are interpolated along with directions
    (equal-norm inputs give a result of that same norm for every t).

    The great circle through a and b is unreliable or undefined in two cases,
    where the result is lerp(a, b, t) instead and `path` says which:
      "zero":   |a| = 0 or |b| = 0 (no direction to rotate from or to);
      "linear": 1 - |cos θ| < eps, i.e. nearly parallel (sin θ ≈ 0 and the
                coefficients are 0/0) or nearly anti-parallel (every great
                circle through two antipodes is equally valid). Note that
                lerp of anti-parallel vectors passes near the origin.
    eps > 0 keeps sin θ away from 0 on the "slerp" path. `reduce`: a and b are shards (see the module).
    """
    if not eps > 0:
        raise ValueError(f"eps={eps} is not valid; expected eps > 0")
    if a.shape != b.shape:
        raise ValueError(f"slerp of tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double(), b.double()
    norm_a, norm_b, dot = _norms_and_dot(a64, b64, reduce)
    if norm_a == 0.0 or norm_b == 0.0:
        return lerp(a, b, t), "zero"
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if 1.0 - abs(cos) < eps:
        return lerp(a, b, t), "linear"
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    out = (math.sin((1.0 - t) * theta) / sin_theta) * a64 + (math.sin(t * theta) / sin_theta) * b64
    return out.to(a.dtype), "slerp"


def _fold(xs: list[Tensor], eps: float, paths: dict[str, int], reduce: Reduce | None = None) -> Tensor:
    """Equal-weight SLERP of several tensors: m = x1; m = slerp(m, xi, 1/i) for i ≥ 2.

    With t = 1/i each earlier tensor keeps weight 1/i in the linear limit, so
    the running result is the mean there. Order matters off that limit.
    """
    merged = xs[0]
    for i, x in enumerate(xs[1:], start=2):
        merged, path = slerp(merged, x, 1.0 / i, eps, reduce)
        paths[path] += 1
    return merged


def _transplant(fused: Tensor, base: Tensor, task_values: list[Tensor], masks: list[Tensor | None]) -> Tensor:
    """Core positions take the owning task's value; the largest |θi - θ0| wins overlaps."""
    best = torch.full(base.shape, -math.inf, dtype=torch.float64, device=base.device)
    base64 = base.double()
    for value, mask in zip(task_values, masks):
        if mask is None:
            continue
        magnitude = (value.double() - base64).abs()
        take = mask & (magnitude > best)  # strict: on ties the earlier task keeps the position
        fused[take] = value[take].to(fused.dtype)
        best[take] = magnitude[take]
    return fused


def _validate(
    base: dict[str, Tensor],
    tasks: dict[str, dict[str, Tensor]],
    cores: dict[str, dict[str, Tensor]],
    omega: float,
    space: str,
) -> None:
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not valid; expected one of {list(SPACES)}")
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega={omega} is not valid; expected 0 <= omega <= 1")
    if not tasks:
        raise ValueError("tasks is empty; fuse needs at least one task model")
    for task, state in tasks.items():
        if state.keys() != base.keys():
            diff = sorted(set(state) ^ set(base))
            raise ValueError(f"tasks[{task!r}] keys differ from base: {diff[:5]}")
        for name, value in state.items():
            if value.shape != base[name].shape:
                shapes = f"{tuple(value.shape)}, base has {tuple(base[name].shape)}"
                raise ValueError(f"tasks[{task!r}][{name!r}] has shape {shapes}")
    for task, masks in cores.items():
        if task not in tasks:
            raise ValueError(f"cores[{task!r}] names no task; tasks are {list(tasks)}")
        for name, mask in masks.items():
            if name not in base:
                raise ValueError(f"cores[{task!r}][{name!r}] names no parameter of base")
            if mask.dtype != torch.bool or mask.shape != base[name].shape:
                raise ValueError(
                    f"cores[{task!r}][{name!r}] must be a bool mask of shape {tuple(base[name].shape)}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )


def fuse(
    base: dict[str, Tensor],
    tasks: dict[str, dict[str, Tensor]],
    cores: dict[str, dict[str, Tensor]],
    *,
    omega: float,
    eps: float,
    space: str = "task_vector",
    reduce: Reduce | None = None,
) -> tuple[dict[str, Tensor], dict[str, dict[str, int]]]:
    """CPI-FT step 4: one backbone from base θ0, task models θi and their cores Ci.

    Tasks are taken in the iteration order of `tasks` (the fixed task order).
    Per floating-point tensor (SLERP sees the whole flattened tensor, core
    positions included):

    Non-core positions, omega = how far from the base towards the merged task
    models (0 → θ0, 1 → the merged task models; one task at 1 → θ1):
      space="task_vector": τi = θi - θ0, T = fold(τ1..τn), result = θ0 + omega·T.
          The base is the origin of this space, so moving towards T is scaling
          it (SLERP towards a zero vector has no angle to follow).
      space="weight": M = fold(θ1..θn), result = slerp(θ0, M, omega).
      fold(x1..xn): m = x1; m = slerp(m, xi, 1/i) for i = 2..n.

    Core positions ("transplant"): a position in Ci takes θi's value exactly.
    Where cores overlap, the task with the largest |θi - θ0| at that position
    wins; on a tie the task earlier in the order wins. A parameter missing from
    cores[task] (or a task missing from cores) has no core there.

    Non-floating tensors (int buffers) are copied from base.

    Returns (fused state dict of new tensors, log): log[name] counts the path
    of every SLERP call on that tensor, {"slerp", "linear", "zero"}: the n - 1
    folds, plus in weight space the final base → M step. Weight-space SLERP of
    fine-tunes of one base is nearly colinear (PAPERS.md: cosine ≈ 0.9999), so
    it lands on "linear" once 1 - cos < eps; task vectors rarely do.

    `reduce` (parallel=fsdp): base, tasks and cores are this rank's shards; see the module docstring.
    """
    _validate(base, tasks, cores, omega, space)
    order = list(tasks)
    fused: dict[str, Tensor] = {}
    log: dict[str, dict[str, int]] = {}
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            fused[name] = theta0.clone()
            continue
        paths = dict.fromkeys(PATHS, 0)
        values = [tasks[task][name] for task in order]
        base64 = theta0.double()
        if space == "task_vector":
            merged = _fold([v.double() - base64 for v in values], eps, paths, reduce)
            out = (base64 + omega * merged).to(theta0.dtype)
        else:
            merged = _fold([v.double() for v in values], eps, paths, reduce)
            out64, path = slerp(base64, merged, omega, eps, reduce)
            paths[path] += 1
            out = out64.to(theta0.dtype)
        masks = [cores.get(task, {}).get(name) for task in order]
        fused[name] = _transplant(out, theta0, values, masks)
        log[name] = paths
    return fused, log
