"""Isolation masks and the pure tensor functions that build, compare and store them.

A mask set maps a parameter name to a bool tensor of that parameter's shape;
True means the element is isolated (frozen). Names missing from a mask set are
all-False, so a mask set only needs entries that isolate something.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from epi.sharding import Shards

Masks = dict[str, Tensor]

INCLUDE_KEYS = ("embeddings", "norms", "biases")
NORMALIZE_METHODS = ("none", "mean", "max")
SCOPES = ("global", "layer", "tensor")
METHODS = ("exact", "sampled")

# Size of the sample that brackets the exact threshold; it only affects speed.
_BRACKET_SAMPLE = 1 << 17
_BRACKET_DELTA = 1e-9
_LAYER = re.compile(r"^(.*?\b(?:layers|h)\.\d+)\.")


class NonFiniteScores(ValueError):
    """Scores with NaN or inf: no ranking of them is meaningful (a NaN compares False and selects nothing)."""


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; expected one of {list(valid)}")


def param_kind(name: str, param: Tensor) -> str:
    """Kind of a parameter: "embedding", "norm", "bias" or "weight".

    Name based (HF Llama-style names); a 1-D parameter that no name rule
    catches is a scale vector and counts as a norm, so it can never slip into
    the linear-weight pool unnoticed.
    """
    lowered = name.lower()
    if "embed_tokens" in lowered or "lm_head" in lowered:
        return "embedding"
    if "norm" in lowered:
        return "norm"
    if lowered.endswith("bias"):
        return "bias"
    if param.dim() < 2:
        return "norm"
    return "weight"


def participating(named_params: dict[str, Tensor], include: dict[str, bool]) -> dict[str, Tensor]:
    """Parameters that take part in selection; linear weights always do.

    `include` keys: embeddings, norms, biases (a missing key means False), so
    whether e.g. the embedding matrix may be frozen is an explicit choice.
    """
    for key in include:
        _check_choice("include key", key, INCLUDE_KEYS)
    allowed = {"weight"}
    allowed |= {kind for key, kind in zip(INCLUDE_KEYS, ("embedding", "norm", "bias")) if include.get(key, False)}
    return {name: p for name, p in named_params.items() if param_kind(name, p) in allowed}


def under(name: str, module: str) -> bool:
    """Whether the parameter (or module) `name` lies under `module`: is it, or is one of its children
    (model.layers.0.mlp.up_proj.weight lies under model.layers.0 and under model.layers.0.mlp, not under model.layers.1)."""
    return name == module or name.startswith(module + ".")


def owner(name: str) -> str:
    """The module a parameter belongs to: its name without the attribute (model.norm.weight -> model.norm)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def layer_of(name: str) -> str:
    """Layer group of a parameter: `model.layers.3` for anything inside block 3.

    Parameters outside the numbered blocks (embeddings, final norm, lm_head)
    are each their own group.
    """
    match = _LAYER.match(name)
    return match.group(1) if match else name


def _groups(names: list[str] | dict[str, object]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name), []).append(name)
    return groups


def normalize(scores: dict[str, Tensor], how: str, shards: Shards | None = None) -> dict[str, Tensor]:
    """Divide scores by their layer group's mean or max so layers of different
    gradient scale compete fairly in a global ranking.

    `shards`: the scores are this rank's shards (`parallel=fsdp`); the layer means and maxima are
    then taken over every rank's shards, so each rank divides by the unsharded run's number."""
    _check_choice("normalize", how, NORMALIZE_METHODS)
    if how == "none":
        return dict(scores)
    out: dict[str, Tensor] = {}
    for names in _groups(scores).values():
        if how == "mean":
            sums = [scores[n].sum(dtype=torch.float64).item() for n in names]  # summed as floats, in name order
            if shards:
                sums = shards.sum(torch.tensor(sums, dtype=torch.float64)).tolist()
            total = sum(sums)
            denom = total / sum(shards.numel[n] if shards else scores[n].numel() for n in names)
        else:
            maxima = [scores[n].max().item() if scores[n].numel() else -math.inf for n in names]
            if shards:
                maxima = shards.max(torch.tensor(maxima, dtype=torch.float64)).tolist()
            denom = max(maxima)
        denom = max(denom, torch.finfo(torch.float32).tiny)  # an all-zero group stays zero
        for n in names:
            out[n] = scores[n] / denom
    return out


def sampled_fraction_bound(sample_size: int, delta: float = 1e-6) -> float:
    """Bound on |realised fraction − p| of `top_p(method="sampled")`, holding
    with probability ≥ 1 − delta.

    The sample is i.i.d. from the scores' empirical distribution F, so by the
    Dvoretzky–Kiefer–Wolfowitz inequality sup_x |F̂(x) − F(x)| ≤ ε with
    ε = sqrt(ln(2/δ) / (2n)), and the same holds for left limits F(x−). The
    threshold is the m-th largest sample value (m = round(p·n)), so the sample
    fraction ≥ thr is m/n (no ties at thr), within 1/(2n) of p. The realised
    fraction 1 − F(thr−) is hence within ε + 1/(2n) of p. The bound is uniform
    in p: for n = 1e6, δ = 1e-6 it is 0.0027 absolute, i.e. loose relative to a
    small p (the typical error is sqrt(p(1−p)/n), 1e-4 at p = 1%). Scores with
    many exact ties at the threshold are all selected and can exceed it.
    """
    if sample_size < 1 or not 0 < delta < 1:
        raise ValueError(f"need sample_size >= 1 and 0 < delta < 1, got {sample_size}, {delta}")
    return math.sqrt(math.log(2 / delta) / (2 * sample_size)) + 1 / (2 * sample_size)


def _sample(flats: list[Tensor], n: int, generator: torch.Generator | None,
            shards: Shards | None = None, names: list[str] | None = None) -> Tensor:
    """n draws with replacement, uniform over all elements of `flats`, as float32 on CPU.

    With `shards` the flats are this rank's shards of the parameters `names`: the draws are made over the
    whole parameters (the generator is seeded alike on every rank), each rank fills in the draws that land
    in its shard, and a sum over ranks assembles the very sample an unsharded run draws."""
    sizes = torch.tensor([shards.numel[m] for m in names] if shards else [f.numel() for f in flats])
    which = torch.bucketize(torch.randint(int(sizes.sum()), (n,), generator=generator), sizes.cumsum(0), right=True)
    counts = torch.bincount(which, minlength=len(flats)).tolist()
    parts = []
    for i, (flat, count) in enumerate(zip(flats, counts)):
        if not count:
            continue
        drawn = torch.randint(int(sizes[i]), (count,), generator=generator)
        if shards is None:
            parts.append(flat[drawn.to(flat.device)].float().cpu())
            continue
        start = shards.start[names[i]]
        mine = (drawn >= start) & (drawn < start + flat.numel())
        values = torch.zeros(count, dtype=torch.float32)
        values[mine] = flat[(drawn[mine] - start).to(flat.device)].float().cpu()
        parts.append(values)
    sample = torch.cat(parts)
    return shards.sum(sample) if shards else sample


def _kth_largest(values: Tensor, k: int) -> float:
    return torch.kthvalue(values, values.numel() - k + 1).values.item()


def _count(values: list[Tensor | int], shards: Shards | None) -> list[int]:
    """Counts summed over ranks (as they are in one process)."""
    local_counts = torch.tensor([int(v) for v in values], dtype=torch.int64)
    return (shards.sum(local_counts) if shards else local_counts).tolist()


def _exact_threshold(flats: list[Tensor], k: int, shards: Shards | None = None,
                     names: list[str] | None = None) -> tuple[float, int]:
    """(k-th largest value, number of elements strictly above it).

    Brackets the threshold with a sample, then ranks only the elements inside
    the bracket: a few linear passes instead of a selection over everything.
    Falls back to the full set when the bracket misses (the result is exact
    either way; only the speed depends on the sample). With `shards`, counts
    are summed and the bracket's values gathered over ranks: the same threshold.
    """
    n_total = sum(shards.numel[m] for m in names) if shards else sum(f.numel() for f in flats)
    bracket = None
    if n_total > 4 * _BRACKET_SAMPLE:
        sample = _sample(flats, _BRACKET_SAMPLE, torch.Generator().manual_seed(0), shards, names)
        eps = sampled_fraction_bound(_BRACKET_SAMPLE, _BRACKET_DELTA)
        frac = k / n_total
        lo_rank = math.ceil((frac + eps) * _BRACKET_SAMPLE)  # ranks from the top
        hi_rank = math.floor((frac - eps) * _BRACKET_SAMPLE)
        lo = _kth_largest(sample, lo_rank) if lo_rank <= _BRACKET_SAMPLE else -math.inf
        hi = _kth_largest(sample, hi_rank) if hi_rank >= 1 else math.inf
        bracket = (lo, hi)
    # The threshold must be one of the scores exactly: rank in their precision.
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in flats) else torch.float32
    for lo, hi in [bracket, (-math.inf, math.inf)] if bracket else [(-math.inf, math.inf)]:
        above = sum(_count([(f > hi).sum() for f in flats], shards))
        band = torch.cat([f[(f >= lo) & (f <= hi)].to(dtype).cpu() for f in flats])
        if shards:
            band = shards.gather(band)
        if above < k <= above + band.numel():
            thr = _kth_largest(band, k - above)
            return thr, sum(_count([(f > thr).sum() for f in flats], shards))
    raise ValueError("scores contain NaN: fewer than k comparable elements")


def _select(scores: dict[str, Tensor], p: float, method: str, sample_size: int,
            generator: torch.Generator | None, shards: Shards | None = None) -> Masks:
    names = list(scores)
    flats = [scores[n].detach().reshape(-1) for n in names]
    n_total = sum(shards.numel[n] for n in names) if shards else sum(f.numel() for f in flats)
    if method == "sampled" and n_total > sample_size:
        sample = _sample(flats, sample_size, generator, shards, names)
        thr = _kth_largest(sample, max(1, round(p * sample_size)))
        return {n: scores[n] >= thr for n in names}
    k = max(1, round(p * n_total))
    thr, above = _exact_threshold(flats, k, shards, names)
    masks = {n: scores[n] > thr for n in names}
    need = k - above
    for n in names:  # break ties at the threshold in name order, then element order
        if need == 0:
            break
        ties = (scores[n] == thr).reshape(-1)
        n_ties = int(torch.count_nonzero(ties))
        before, total = 0, n_ties
        if shards:  # a parameter's elements run through the ranks in order: earlier ranks' ties come first
            per_rank = shards.gather(torch.tensor([n_ties], dtype=torch.int64)).tolist()
            before, total = sum(per_rank[: shards.rank]), sum(per_rank)
        mine = max(0, min(n_ties, need - before))
        if n_ties > mine:
            ties[ties.nonzero()[mine:, 0]] = False
        masks[n] |= ties.view_as(masks[n])
        need -= min(total, need)
    return masks


def all_finite(t: Tensor) -> bool:
    """Whether every element is finite. A NaN or inf makes the sum NaN or inf, so a finite sum settles it in one
    pass without a bool temporary (13x `isfinite(t).all()` on 20M elements); an overflowing sum of finite
    values is told apart by the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def top_p(scores: dict[str, Tensor], p: float, scope: str = "global", method: str = "exact",
          sample_size: int = 1_000_000, generator: torch.Generator | None = None,
          shards: Shards | None = None) -> Masks:
    """Isolate the top fraction p of elements by score.

    scope: "global" ranks all tensors together, "layer" within each layer
    group (`layer_of`), "tensor" within each tensor. method "exact" selects
    exactly k = max(1, round(p·N)) elements per ranking (ties broken in order);
    "sampled" thresholds at the (1 − p) quantile of `sample_size` uniform draws
    (with replacement, from `generator`; one sample per ranking group) and
    selects `scores >= thr`; see `sampled_fraction_bound` for its accuracy. A
    group with at most `sample_size` elements is ranked exactly instead: that
    is cheaper than sampling it and never less accurate.
    Pass a generator seeded identically on every data-parallel rank.
    `shards` (`parallel=fsdp`): `scores` are this rank's shards; the ranking is over
    every rank's, and the masks (of the local shards) are the unsharded run's rows.
    """
    if not 0 < p <= 1:
        raise ValueError(f"p={p!r} is not valid; expected 0 < p <= 1")
    _check_choice("scope", scope, SCOPES)
    _check_choice("method", method, METHODS)
    bad = [n for n, t in scores.items() if not all_finite(t)]
    if shards and _count([bool(bad)], shards)[0] and not bad:
        bad = ["(on another rank)"]
    if bad:
        raise NonFiniteScores(f"scores of {len(bad)} tensor(s) are NaN or inf, e.g. {bad[0]!r}")
    if scope == "global":
        groups = [list(scores)]
    elif scope == "layer":
        groups = list(_groups(scores).values())
    else:
        groups = [[n] for n in scores]
    masks: Masks = {}
    for names in groups:
        masks.update(_select({n: scores[n] for n in names}, p, method, sample_size, generator, shards))
    return {n: masks[n] for n in scores}


def _get(masks: Masks, name: str, like: Tensor) -> Tensor:
    return masks[name] if name in masks else torch.zeros_like(like, dtype=torch.bool)


def jaccard(a: Masks, b: Masks, shards: Shards | None = None) -> float:
    """|A ∩ B| / |A ∪ B| over all elements; two empty masks overlap fully (1.0). `shards`: over every rank's shards."""
    both = size_a = size_b = 0
    for name in sorted(a.keys() | b.keys()):
        x = _get(a, name, b.get(name))
        y = _get(b, name, x)
        both += int(torch.count_nonzero(x & y))  # count_nonzero: ~4x a bool .sum(), which widens to int64 first
        size_a += int(torch.count_nonzero(x))
        size_b += int(torch.count_nonzero(y))
    return jaccard_counts(both, size_a, size_b, shards)


def jaccard_counts(both: int, size_a: int, size_b: int, shards: Shards | None = None) -> float:
    """`jaccard` from |A ∩ B|, |A| and |B| (this rank's, summed over ranks under `shards`): 1.0 for two empty sets."""
    both, size_a, size_b = _count([both, size_a, size_b], shards)
    either = size_a + size_b - both
    return both / either if either else 1.0


def hits(index: dict[str, Tensor], masks: Masks) -> int:
    """How many of the coordinates `index` (flat indices per parameter) are True in `masks`: |A ∩ B| with A as
    indices, read at A's coordinates only."""
    return sum(int(torch.count_nonzero(masks[name].reshape(-1)[idx.long().to(masks[name].device)]))
               for name, idx in index.items() if name in masks and idx.numel())


def churn(old: Masks, new: Masks, shards: Shards | None = None) -> dict[str, int]:
    """Element counts a refresh newly protects, releases and keeps (`shards`: over every rank's shards)."""
    counts = {"protected": 0, "released": 0, "kept": 0}
    for name in old.keys() | new.keys():
        o = _get(old, name, new.get(name))
        n = _get(new, name, o)
        kept = int(torch.count_nonzero(o & n))
        counts["protected"] += int(torch.count_nonzero(n)) - kept
        counts["released"] += int(torch.count_nonzero(o)) - kept
        counts["kept"] += kept
    return dict(zip(counts, _count(list(counts.values()), shards)))


def churn_indices(old: dict[str, Tensor], new: dict[str, Tensor], shards: Shards | None = None) -> dict[str, int]:
    """`churn` of masks given as unique flat indices per parameter, in any order (no mask is materialised)."""
    counts = {"protected": 0, "released": 0, "kept": 0}
    for name in old.keys() | new.keys():
        o = old.get(name, torch.empty(0, dtype=torch.int64))
        n = new.get(name, torch.empty(0, dtype=torch.int64))
        kept = int(torch.count_nonzero(torch.isin(n, o, assume_unique=True))) if o.numel() and n.numel() else 0
        counts["protected"] += n.numel() - kept
        counts["released"] += o.numel() - kept
        counts["kept"] += kept
    return dict(zip(counts, _count(list(counts.values()), shards)))


def mask_stats(masks: Masks, numels: dict[str, int] | None = None, shards: Shards | None = None) -> dict[str, float]:
    """Isolated fraction overall and per layer group (`frac/<layer>`).

    Pass `numels` (name → element count of every trainable parameter) when the
    mask set is sparse, so untouched parameters count in the denominators.
    `shards`: the masks are this rank's shards; `numels` are then the whole
    parameters' counts and the isolated counts are summed over ranks.
    """
    whole = {n: shards.numel[n] if shards else m.numel() for n, m in masks.items()}
    numels = {**numels, **{n: c for n, c in whole.items() if n not in numels}} if numels is not None else whole
    return count_stats({n: int(torch.count_nonzero(m)) for n, m in masks.items()}, numels, shards)


def count_stats(isolated: dict[str, int], numels: dict[str, int], shards: Shards | None = None) -> dict[str, float]:
    """`mask_stats` from each parameter's count of isolated coordinates (this rank's, summed over ranks under
    `shards`); `numels`: the whole element count of every trainable parameter, `isolated`'s names among them."""
    counts = dict(zip(numels, _count([isolated.get(n, 0) for n in numels], shards)))
    total = sum(numels.values())
    stats = {"isolated_fraction": sum(counts.values()) / total if total else 0.0}
    for layer, names in _groups(numels).items():
        size = sum(numels[n] for n in names)
        stats[f"frac/{layer}"] = sum(counts[n] for n in names) / size if size else 0.0
    return stats


def union(*masks: Masks) -> Masks:
    """Element-wise OR of mask sets (e.g. the cores of all earlier stages)."""
    out: Masks = {}
    for mask_set in masks:
        for name, m in mask_set.items():
            out[name] = out[name] | m if name in out else m.clone()
    return out


def pack(masks: Masks) -> dict[str, dict]:
    """Bit-pack masks (1 bit per element) for checkpoints; safe for `torch.load(weights_only=True)`."""
    return {
        name: {"bits": torch.from_numpy(np.packbits(m.detach().cpu().reshape(-1).numpy())), "shape": list(m.shape)}
        for name, m in masks.items()
    }


def unpack(packed: dict[str, dict]) -> Masks:
    """Inverse of `pack` (CPU tensors)."""
    out: Masks = {}
    for name, entry in packed.items():
        shape = tuple(entry["shape"])
        bits = np.unpackbits(entry["bits"].numpy(), count=math.prod(shape)).astype(bool)
        out[name] = torch.from_numpy(bits).reshape(shape)
    return out


def indices(masks: Masks) -> dict[str, Tensor]:
    """Flat indices of each mask's True elements, int32 where they fit: 4 bytes per isolated coordinate,
    where a packed mask costs 1 bit per coordinate of the whole parameter (cheaper only above p = 1/32)."""
    out = {}
    for name, mask in masks.items():
        flat = mask.reshape(-1).nonzero().squeeze(1)
        out[name] = flat.to(torch.int32) if mask.numel() < 2**31 else flat
    return out


def from_indices(index: dict[str, Tensor], shapes: dict[str, torch.Size]) -> Masks:
    """The masks `indices` came from, given the parameters' shapes."""
    out: Masks = {}
    for name, idx in index.items():
        mask = torch.zeros(math.prod(shapes[name]), dtype=torch.bool)
        out[name] = mask.index_fill_(0, idx.long().cpu(), True).view(shapes[name])
    return out
