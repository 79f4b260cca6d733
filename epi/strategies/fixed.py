"""`strategy=fixed`: freeze named modules for the whole run (the embeddings, a layer, the LM head).

A baseline in its own right (does a hand-picked frozen module protect as well as importance-chosen
coordinates?) and the worked example of "A new strategy" in the README: this file and
conf/strategy/fixed.yaml are all it takes; the trainer does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from epi.errors import UserError
from epi.masks import under
from epi.schema import Schema
from epi.strategies.base import Context, Stage, Strategy, freeze_whole


@dataclass
class FixedConfig(Schema):
    modules: list[str]  # module names, e.g. [model.embed_tokens, model.layers.0]; every parameter under them is frozen


class FixedModule(Strategy):
    """Freezes every parameter under the named modules, from the first step to the last."""

    name = "fixed"  # the registry name: conf/strategy/fixed.yaml
    Config = FixedConfig
    shardable = True  # its masks are all-True on whatever part of a parameter this rank holds

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        chosen = [n for n in ctx.named_params if any(under(n, m) for m in self.cfg.modules)]
        if not chosen:
            raise UserError(f"strategy.modules={self.cfg.modules}: no parameter lies under these names; parameters are named like {list(ctx.named_params)[:3]}")
        frozen = freeze_whole(ctx, chosen)["isolated_fraction"]
        ctx.log(0, "mask", {"isolated_fraction": frozen})
        ctx.info(f"fixed: {len(chosen)} tensors frozen ({frozen:.2%} of the trainable parameters)")
        return stages
