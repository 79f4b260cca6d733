"""`strategy=fixed`: freeze named modules for the whole run (the embeddings, a layer, the LM head).

A baseline in its own right (does a hand-picked frozen module protect as well as importance-chosen
coordinates?) and the worked example of "A new strategy" in the README: this file and
conf/strategy/fixed.yaml are all it takes; the trainer does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epi.errors import UserError
from epi.schema import Schema
from epi.sharding import local
from epi.strategies.base import Context, Stage, Strategy


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
        chosen = {n: p for n, p in ctx.named_params.items() if any(n == m or n.startswith(m + ".") for m in self.cfg.modules)}
        if not chosen:
            raise UserError(f"strategy.modules={self.cfg.modules}: no parameter lies under these names; parameters are named like {list(ctx.named_params)[:3]}")
        ctx.set_masks({n: torch.ones_like(local(p), dtype=torch.bool) for n, p in chosen.items()})
        frozen = sum(p.numel() for p in chosen.values()) / sum(p.numel() for p in ctx.named_params.values())
        ctx.log(0, "mask", {"isolated_fraction": frozen})
        ctx.info(f"fixed: {len(chosen)} tensors frozen ({frozen:.2%} of the trainable parameters)")
        return stages
