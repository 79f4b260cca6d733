"""What the isolation engine and each built-in strategy hold, predicted from the parameters' shapes and the config.

Each entry (`Held`) is one tensor family, read off the code that allocates it (epi/optim.py and the strategy's
module): its bytes on this rank, whether it lives on the model's device or in host memory, when it is alive, and
whether the number is exact or a bound, because some sizes are decided by the data: how many coordinates several
tasks' top-p sets share, which of a sharded parameter's rows a ranking picks, how many groups CPI's probes find.

When it is alive (`phase`):
- `run`: between steps, for the rest of the run from when it is first set (the largest value over the run);
- `step`: inside each optimizer step (the engine's stash and held values, MoFO's copy), gone after it;
- `refresh`: while a mask is recomputed (scores and selections, every `refresh_every` steps);
- `prepare`: while probes or calibrations train a copy (CPI, multistage, LoTA), before or between stages.

tests/test_plan.py holds the `run` entries to the byte against `epi.memory.state_bytes` of a real run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from epi.masks import layer_of, participating, under
from epi.memory import Shapes
from epi.strategies import Stage, Strategy
from epi.strategies.badam import BAdam, infer_blocks
from epi.strategies.cpi import CPI
from epi.strategies.epi import EPI, EvolvingIsolation
from epi.strategies.fixed import FixedModule
from epi.strategies.freeze import Freeze, decoder_layers
from epi.strategies.hft import HFT, draw_frozen, generator, layer_groups
from epi.strategies.lota import LoTA
from epi.strategies.mofo import MoFO
from epi.strategies.none import NoIsolation
from epi.strategies.spectrum import Spectrum, module_type, top_by_type

INDEX = 8  # the engine stores isolated coordinates as int64 flat indices
Bound = Literal["exact", "at most", "about"]
Phase = Literal["run", "step", "refresh", "prepare"]


@dataclass(frozen=True)
class Held:
    what: str
    bytes: int
    device: bool  # on the model's device; False: host memory
    phase: Phase
    bound: Bound
    why: str = ""  # what decides the number when it is not exact


@dataclass(frozen=True)
class RunShape:
    """What the prediction needs of the run besides the shapes: its tasks and stages, seed, moment policy and dtypes."""

    tasks: tuple[str, ...]
    stages: list[Stage]
    seed: int
    moments: str  # isolation.moments: under `track` the engine stashes isolated gradients around the clip
    grad_size: int  # bytes per gradient element (the parameters' dtype)
    sharded: bool  # parallel=fsdp on several ranks: a ranking's share on this rank is the data's


def isolation_held(strategy: Strategy, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    """Every tensor family the engine and `strategy` hold on this rank. `copy_bytes`: what one trained copy of the
    model costs on the device (parameters, gradients, optimizer state) where a strategy trains one (CPI's probes,
    LoTA's calibrations; under FSDP the run's own sharded model trains instead, so 0)."""
    for kind, predict in PREDICTORS:
        if isinstance(strategy, kind):
            return predict(strategy, shapes, run, copy_bytes)
    name = type(strategy).__name__
    return [Held(f"{name}'s own state", 0, True, "run", "about", "a plug-in: the plan does not know what it holds")]


# ---------------------------------------------------------------- helpers
def selected(numels: dict[str, int], p: float, scope: str, exact: bool = True, sample_size: int = 0) -> tuple[dict[str, int], bool]:
    """Per ranking group (epi.masks.top_p's scopes), how many coordinates a top-p selects, and whether that is exact:
    k = max(1, round(p N)) when ranked exactly (`exact`, or a group of at most `sample_size` elements), about p N when
    thresholded from a sample."""
    if scope == "global":
        groups = {"all": list(numels)}
    elif scope == "layer":
        groups = {}
        for name in numels:
            groups.setdefault(layer_of(name), []).append(name)
    else:
        groups = {name: [name] for name in numels}
    counts, all_exact = {}, True
    for group, names in groups.items():
        n = sum(numels[m] for m in names)
        ranked = exact or n <= sample_size
        counts[group] = max(1, round(p * n)) if ranked else round(p * n)
        all_exact &= ranked
    return counts, all_exact


def local_share(count: int, whole: int, mine: int) -> int:
    """This rank's expected share of `count` coordinates drawn from `whole`, of which it holds `mine`."""
    return count if mine == whole else round(count * mine / whole)


def whole_freeze(shapes: Shapes, frozen: list[str] | set[str], what: str, bound: Bound = "exact", why: str = "") -> list[Held]:
    """`freeze_whole`: every coordinate of the named parameters isolated, as int64 flat indices of this rank's shards."""
    return [Held(f"engine: indices of the frozen tensors' coordinates ({what})", INDEX * shapes.local_sum(frozen), True,
                 "run", bound, why)] if frozen else []


def step_stash(shapes: Shapes, run: RunShape, isolated: int, bound: Bound) -> list[Held]:
    """Inside each step the engine keeps the isolated coordinates' gradients (under moments=track, to feed them to the
    optimizer after the clip) and their values (to put back after the inner step)."""
    elem = next(iter(shapes.trainable.values())).element_size() if shapes.trainable else 4
    per = elem + (run.grad_size if run.moments == "track" else 0)
    return [Held("engine: isolated gradients and values kept across the inner step", per * isolated, True, "step", bound)] if isolated else []


def packed(shapes: Shapes, names: list[str]) -> int:
    """Bytes of `epi.masks.pack` of bool masks of these parameters' shards: one bit per coordinate, per tensor rounded up."""
    return sum(math.ceil(shapes.local(n) / 8) for n in names)


def model_copy(shapes: Shapes, who: str, copies: int, which: str, copy_bytes: int) -> list[Held]:
    """A strategy that trains copies (`Context.train_copy`): on the device, a copy of the model with its gradients
    and optimizer state (unsharded runs; under FSDP the run's own shards train, `copy_bytes` 0); in host memory,
    `copies` CPU copies of the weights at once (`model_state`; this rank's shards under FSDP). About: a state dict
    also holds the persistent buffers, and a tied weight under both its names."""
    weights = shapes.bytes(shapes.trainable)
    held = [Held(f"{who}: the copy it trains (parameters, gradients, optimizer state)", copy_bytes, True, "prepare", "exact")] if copy_bytes else []
    return held + [Held(f"{who}: {which}, {copies} CPU copies of the weights", copies * weights, False, "prepare", "about")]


# ---------------------------------------------------------------- per strategy
def _evolving(strategy: EvolvingIsolation, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    cfg = strategy.cfg
    pool = participating(shapes.trainable, cfg.include)
    names = list(pool)
    whole = {n: pool[n].numel() for n in names}
    counts, exact = selected(whole, cfg.p, cfg.scope, cfg.method == "exact", cfg.sample_size)
    k_whole = sum(counts.values())
    n_whole, n_local = sum(whole.values()), shapes.local_sum(names)
    k = local_share(k_whole, n_whole, n_local)
    bound: Bound = "exact" if exact and not run.sharded else "about"
    why = "method=sampled: the count is p N within epi.masks.sampled_fraction_bound" if not exact else ""
    if run.sharded:
        why = "a sharded rank holds the selected coordinates that fall in its rows: their mean share is shown"
    held: list[Held] = []
    if isinstance(strategy, EPI) and cfg.beta is not None:
        held.append(Held(f"importance EMA of {cfg.signal} (fp32, beta={cfg.beta})", 4 * n_local, True, "run", "exact"))
    held.append(Held("first mask, bit-packed (the drift reference)", packed(shapes, names), False, "run", "exact"))
    tasks = len(run.tasks)
    if cfg.mode == "exclusive":
        union = min(tasks * k, n_local)
        held.append(Held(f"engine: owned coordinates of {tasks} task(s), int64 index grouped by owner set",
                         INDEX * union, True, "run", bound if tasks == 1 else "at most",
                         why or "how many coordinates the tasks' top-p sets share: at most tasks x k"))
        held.append(Held("each task's first mask, int32 indices (drift)", tasks * 4 * k, False, "run", bound, why))
        held.append(Held("engine: coordinates held in a step (owners absent), index and value", (INDEX + 4) * union, True,
                         "step", "at most", "which tasks a batch holds"))
        held.append(Held("one task's calibration gradient, its scores (fp32) and selection (bool)", (run.grad_size + 4 + 1) * n_local,
                         True, "refresh", "about"))
        held.append(Held("the tasks' masks before and after (bool, host)", 2 * tasks * n_local, False, "refresh", "about"))
        return held
    if cfg.hysteresis > 1:
        held.append(Held("hysteresis miss counters (uint8)", n_local, True, "run", "exact"))
        held.append(Held("engine: isolated coordinates, int64 flat indices", INDEX * min(cfg.hysteresis * k, n_local), True, "run",
                         "at most", "hysteresis keeps released coordinates for up to hysteresis refreshes: at most hysteresis x k"))
    else:
        held.append(Held("engine: isolated coordinates, int64 flat indices", INDEX * k, True, "run", bound, why))
    held += step_stash(shapes, run, k, bound)
    scores = 4 if (isinstance(strategy, EPI) and cfg.norm != "none") or not isinstance(strategy, EPI) else 0
    held.append(Held("normalised scores (fp32) and the selection (bool)", (scores + 1) * n_local, True, "refresh", "about"))
    held.append(Held("old and new masks (bool, host) for the statistics", 2 * n_local, False, "refresh", "about"))
    return held


def _cpi(strategy: CPI, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    cfg = strategy.cfg
    tasks = len(run.tasks)
    pool = participating(shapes.trainable, cfg.include)
    names = list(pool)
    n_local = shapes.local_sum(names)
    held = [Held(f"cores of {tasks} tasks (bool, one per isolable coordinate and task)", tasks * n_local, False, "run", "exact")]
    if strategy.freeze_cores and tasks > 1:
        counts, _ = selected({n: pool[n].numel() for n in names}, cfg.p, cfg.scope)
        k = local_share(sum(counts.values()), sum(p.numel() for p in pool.values()), n_local)
        earlier = min((tasks - 1) * k, n_local)  # the last stage freezes the cores of every earlier group
        why = ("the union of the earlier groups' cores, from the second stage on: at most (tasks - 1) x k; "
               "the groups are found by probing")
        if cfg.mode == "exclusive":
            held.append(Held("engine: earlier groups' cores, int64 index grouped by owner set", INDEX * earlier,
                             True, "run", "at most", why))
        else:
            held.append(Held("engine: earlier groups' cores, int64 flat indices", INDEX * earlier, True, "run", "at most", why))
            held += step_stash(shapes, run, earlier, "at most")
    which = "theta0, every task's probe" + (" and the fused weights" if strategy.fuse_models else "")
    held += model_copy(shapes, "probes", tasks + (2 if strategy.fuse_models else 1), which, copy_bytes)
    held.append(Held("probes: |theta_i - theta0| of one task (fp32, host)", 4 * n_local, False, "prepare", "exact"))
    return held


def _lota(strategy: LoTA, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    cfg = strategy.cfg
    pool = participating(shapes.trainable, cfg.include)
    names = list(pool)
    counts, _ = selected({n: pool[n].numel() for n in names}, 1 - cfg.sparsity, cfg.scope)
    ticket = sum(counts.values())
    frozen = shapes.local_sum(shapes.trainable) - ticket
    stages = len(run.stages)
    widest = max(len(stage.tasks) for stage in run.stages)
    held = [
        Held(f"tickets of {stages} stage(s) (bool, host)", stages * shapes.local_sum(names), False, "run", "exact"),
        Held("engine: everything outside the ticket, int64 flat indices", INDEX * frozen, True, "run", "exact"),
    ]
    held += step_stash(shapes, run, frozen, "exact")
    held += model_copy(shapes, "calibration", 2, "theta0 and one task's tuned copy", copy_bytes)
    held.append(Held(f"calibration: {widest} task vector(s) (fp32, host)", widest * 4 * shapes.local_sum(names), False, "prepare", "exact"))
    return held


def _mofo(strategy: MoFO, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    filtered = participating(shapes.trainable, strategy.cfg.include)
    largest = max((shapes.local(n) for n in filtered), default=0)
    return [
        Held("the filtered tensors' values before the step", shapes.bytes(filtered), True, "step", "exact"),
        Held("the filter of one tensor (|m|, threshold mask)", largest * (4 + 1), True, "step", "about"),
    ]


def _badam(strategy: BAdam, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    cfg = strategy.cfg
    names = list(shapes.trainable)
    blocks = infer_blocks(names, cfg.include_embedding, cfg.include_lm_head)
    if not blocks:
        return []
    frozen = max(([n for n in names if n not in b.params] for b in blocks), key=shapes.local_sum)
    equal = len({shapes.local_sum(b.params) for b in blocks}) == 1
    held = whole_freeze(shapes, frozen, "all but the active block", "exact" if equal else "at most",
                        "" if equal else "the blocks differ in size: the largest frozen set")
    return held + step_stash(shapes, run, shapes.local_sum(frozen), "exact" if equal else "at most")


def _hft(strategy: HFT, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    cfg = strategy.cfg
    names = list(shapes.trainable)
    layers = decoder_layers(names, cfg.layers, "strategy.layers")
    dims = {n: shapes.trainable[n].dim() for n in names}
    groups = [layer_groups(params, dims) for params in layers.params.values()]
    draws = []
    for stage in range(len(run.stages)):
        frozen = draw_frozen(groups, cfg.odd, cfg.norms, generator(run.seed, stage, 0))
        draws.append(frozen + (layers.outside if cfg.others == "freeze" else []))
    frozen = max(draws, key=shapes.local_sum)
    bound: Bound = "exact" if cfg.redraw_every is None else "about"
    held = whole_freeze(shapes, frozen, "the largest of the stages' random halves", bound,
                        "" if bound == "exact" else "redraw_every: later draws freeze other halves of about this size")
    return held + step_stash(shapes, run, shapes.local_sum(frozen), bound)


def _spectrum(strategy: Spectrum, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    cfg = strategy.cfg
    names = list(shapes.trainable)
    weights = [n.removesuffix(".weight") for n in names if n.endswith(".weight")]
    types = {m: module_type(m) for m in weights}
    if cfg.module_types is not None:
        types = {m: t for m, t in types.items() if t in cfg.module_types}
    chosen = top_by_type({m: 0.0 for m in types}, types, cfg.top_fraction)  # which layers win needs the SNRs; how many does not
    modules = [m for members in chosen.values() for m in members]
    modules += [m for m in cfg.always_train if any(under(n, m) for n in names)]
    frozen = [n for n in names if not any(under(n, m) for m in modules)]
    sizes = {}
    for m, t in types.items():
        sizes.setdefault(t, set()).add(sum(shapes.local(n) for n in names if under(n, m)))
    equal = all(len(s) == 1 for s in sizes.values())
    bound: Bound = "exact" if equal else "about"
    held = whole_freeze(shapes, frozen, "the layers outside the top SNRs", bound,
                        "" if equal else "a module type's layers differ in size: which win decides the bytes")
    return held + step_stash(shapes, run, shapes.local_sum(frozen), bound)


def _freeze(strategy: Freeze, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    trainable = strategy.select(list(shapes.trainable))
    frozen = [n for n in shapes.trainable if n not in trainable]
    return whole_freeze(shapes, frozen, "all but the trainable layers") + step_stash(shapes, run, shapes.local_sum(frozen), "exact")


def _fixed(strategy: FixedModule, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    frozen = [n for n in shapes.trainable if any(under(n, m) for m in strategy.cfg.modules)]
    return whole_freeze(shapes, frozen, ", ".join(strategy.cfg.modules)) + step_stash(shapes, run, shapes.local_sum(frozen), "exact")


def _none(strategy: Strategy, shapes: Shapes, run: RunShape, copy_bytes: int) -> list[Held]:
    return []


# Most derived first: multistage is a CPI, random an EvolvingIsolation.
PREDICTORS = ((CPI, _cpi), (LoTA, _lota), (EvolvingIsolation, _evolving), (MoFO, _mofo), (BAdam, _badam), (HFT, _hft),
              (Spectrum, _spectrum), (Freeze, _freeze), (FixedModule, _fixed), (NoIsolation, _none))
