"""`strategy=freeze`: LLaMA-Factory's freeze tuning, the simplest static baseline.

Only the last N decoder layers train (the first |N| for a negative N), optionally only some module kinds inside
them (`mlp`, `self_attn`, ...), plus named modules outside the layers (`embed_tokens`, `norm`, `lm_head`);
everything else is frozen from the first step to the last. The keys keep LLaMA-Factory's names
(`finetuning_type: freeze`, hiyouga/LLaMA-Factory src/llamafactory/hparams/finetuning_args.py, FreezeArguments),
so a config ports as it is; the rule follows its `_setup_freeze_tuning` (src/llamafactory/model/adapter.py).

The decoder layers are found from the parameter names alone (`decoder_layers`), so any model whose layers are a
numbered module list (`model.layers.<i>` in Llama and SmolLM2, `transformer.h.<i>` in GPT-2) works without a
per-architecture table; `strategy.layers` names the list where a model has several.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from epi.errors import UserError
from epi.masks import owner, under
from epi.schema import Schema
from epi.strategies.base import Context, Stage, Strategy, freeze_whole

_NUMBERED = re.compile(r"^(.+?)\.(\d+)\.(.+)$")  # <list>.<index>.<rest>, at the first numbered component
ALL = "all"


@dataclass(frozen=True)
class Layers:
    """The decoder layers of a model, read from its parameter names."""

    prefix: str  # the module list, e.g. model.layers
    params: dict[int, dict[str, str]]  # layer index -> {parameter name relative to the layer: full name}, by index
    outside: list[str]  # full names of the parameters in no decoder layer (embeddings, final norm, head)


def decoder_layers(names: list[str], prefix: str | None, key: str) -> Layers:
    """Groups `names` by decoder layer. `prefix` null: the numbered module list that holds the most parameters
    (a model's decoder stack outweighs any other numbered list); `key` names the config key in errors."""
    by_prefix: dict[str, list[tuple[str, int, str]]] = {}
    for name in names:
        if m := _NUMBERED.match(name):
            by_prefix.setdefault(m.group(1), []).append((name, int(m.group(2)), m.group(3)))
    if prefix is None:
        if not by_prefix:
            raise UserError(f"{key}=null: no numbered module list (like model.layers.0) among the parameters {names[:3]}...; "
                            "this model has no decoder layers to select")
        prefix = max(by_prefix, key=lambda p: len(by_prefix[p]))
    elif prefix not in by_prefix:
        raise UserError(f"{key}={prefix!r}: no parameter lies under {prefix}.<index>.; numbered module lists here: {sorted(by_prefix) or 'none'}")
    params: dict[int, dict[str, str]] = {}
    for name, index, rest in by_prefix[prefix]:
        params.setdefault(index, {})[rest] = name
    inside = {name for name, _, _ in by_prefix[prefix]}
    return Layers(prefix, dict(sorted(params.items())), [n for n in names if n not in inside])


def chosen_layers(indices: list[int], n: int) -> list[int]:
    """LLaMA-Factory's rule: n > 0 the last n layers, n < 0 the first |n|, clamped to the layers there are."""
    return indices[max(0, len(indices) - n):] if n > 0 else indices[: min(-n, len(indices))]


def layer_params(layers: Layers, indices: list[int], modules: list[str]) -> set[str]:
    """The parameters of the chosen layers under the named module kinds (`all`: every one); a kind that
    selects nothing in them is refused, naming the kinds there are."""
    rows = [(rel, full) for i in indices for rel, full in layers.params[i].items()]  # a relative name recurs per layer
    if ALL in modules:
        return {full for _, full in rows}
    picked: set[str] = set()
    for module in modules:
        hit = {full for rel, full in rows if under(rel, module)}
        if not hit:
            kinds = sorted({rel.split(".", 1)[0] for rel, _ in rows})
            raise UserError(f"strategy.freeze_trainable_modules: {module!r} selects no parameter in layers {indices} of "
                            f"{layers.prefix}; choose from {[ALL, *kinds]} (or a path below one, e.g. {kinds[0]}.<child>)")
        picked |= hit
    return picked


def extra_params(outside: list[str], modules: list[str]) -> set[str]:
    """The parameters outside the decoder layers under each named module: matched by the module's own name
    (norm -> model.norm) or its full path (model.embed_tokens); one that matches nothing is refused."""
    picked: set[str] = set()
    for module in modules:
        hit = {n for n in outside if owner(n) == module or owner(n).endswith("." + module) or under(n, module)}
        if not hit:
            names = sorted({owner(n).rsplit(".", 1)[-1] for n in outside})
            raise UserError(f"strategy.freeze_extra_modules: {module!r} matches no parameter outside the decoder layers; "
                            f"choose from {names}")
        picked |= hit
    return picked


@dataclass
class FreezeConfig(Schema):
    """LLaMA-Factory's FreezeArguments, under their own names; defaults: conf/strategy/freeze.yaml."""

    freeze_trainable_layers: int  # > 0: the last n decoder layers train | < 0: the first |n| | 0: none (extra modules only)
    freeze_trainable_modules: list[str]  # [all] or module kinds inside a layer (mlp, self_attn, ...): what trains in those layers
    freeze_extra_modules: list[str]  # modules outside the layers that train too (embed_tokens, norm, lm_head)
    layers: str | None  # the decoder layers' module list (model.layers); null: the numbered list holding the most parameters

    def check(self, key: str) -> None:
        if not self.freeze_trainable_modules:
            raise UserError(f"{key}.freeze_trainable_modules=[]: name at least one module kind, or [all]")
        if self.freeze_trainable_layers == 0 and not self.freeze_extra_modules:
            raise UserError(f"{key}.freeze_trainable_layers=0 with no {key}.freeze_extra_modules trains nothing; "
                            "set a number of layers (e.g. 2: the last two) or name extra modules")


class Freeze(Strategy):
    """Trains only the last N decoder layers (and named extra modules), the rest frozen all run (LLaMA-Factory finetuning_type: freeze)."""

    name = "freeze"  # the registry name: conf/strategy/freeze.yaml
    Config = FreezeConfig
    shardable = True  # whole tensors frozen: all-True masks on whatever part of a parameter this rank holds

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        self.trainable = self.select(list(ctx.named_params))
        frozen = [n for n in ctx.named_params if n not in self.trainable]
        stats = freeze_whole(ctx, frozen)
        ctx.log(0, "mask", {**stats, "frozen_tensors": len(frozen)})
        ctx.info(f"freeze: layers {self.layer_ids} of {self.prefix} train ({', '.join(self.cfg.freeze_trainable_modules)})"
                 f"{' + ' + ', '.join(self.cfg.freeze_extra_modules) if self.cfg.freeze_extra_modules else ''}; "
                 f"{len(frozen)} of {len(ctx.named_params)} tensors frozen ({stats['isolated_fraction']:.2%} of the parameters)")
        return stages

    def select(self, names: list[str]) -> set[str]:
        """The names of the parameters that train; every other one is frozen."""
        layers = decoder_layers(names, self.cfg.layers, "strategy.layers")
        self.prefix = layers.prefix
        self.layer_ids = chosen_layers(list(layers.params), self.cfg.freeze_trainable_layers)
        picked = layer_params(layers, self.layer_ids, self.cfg.freeze_trainable_modules) if self.layer_ids else set()
        return picked | extra_params(layers.outside, self.cfg.freeze_extra_modules)
