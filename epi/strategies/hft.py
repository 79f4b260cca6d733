"""`strategy=hft`: Half Fine-Tuning (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models",
arXiv 2404.18466, ACL 2025).

At the start of every stage a random half of each decoder layer's parameter matrices is frozen and the other
half trains. The draw is made within each block of a layer separately (category level, the paper's best
variant): two of the attention block's four (q, k, v, o); of the feed-forward block's three (gate, up, down),
two in a random half of the layers and one in the other half, so the model-wide count is exactly half
(`odd: balanced`). A unit of the draw is one module (a projection's weight and bias go together).

What is not certain from the sources read here is a key: `odd` (how an odd count rounds), `norms` (the layer
norms: the secondary sources say half of them are drawn too), `others` (embeddings, final norm, LM head: said to
train) and `redraw_every` (the paper's "each epoch" reading: a redraw inside a stage). The draw is a pure
function of the run's seed, the stage index and the redraw count, so a resume redraws the same halves; the
masks themselves come back with the isolation engine's state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from epi.masks import owner
from epi.schema import Schema, at_least
from epi.strategies.base import Context, Stage, Strategy, freeze_whole
from epi.strategies.freeze import decoder_layers

ODD = ("balanced", "floor", "ceil", "random")
NORMS = ("half", "train", "freeze")
OTHERS = ("train", "freeze")
NORM_GROUP = "norms"  # the group of a layer's 1-D-only modules (its layer norms), drawn apart from the blocks


@dataclass
class HFTConfig(Schema):
    """HFT's keys; defaults and where they come from: conf/strategy/hft.yaml."""

    odd: Literal[ODD]  # a block with an odd count n: balanced | floor | ceil | random (see `frozen_counts`)
    norms: Literal[NORMS]  # the layers' norms: half (drawn like a block) | train | freeze
    others: Literal[OTHERS]  # parameters in no decoder layer (embeddings, final norm, LM head): train | freeze
    redraw_every: Annotated[int, at_least(1)] | None  # steps between two draws inside a stage; null: one draw per stage
    layers: str | None  # the decoder layers' module list (model.layers); null: the numbered list holding the most parameters


def layer_groups(params: dict[str, str], dims: dict[str, int]) -> dict[str, list[list[str]]]:
    """One layer's draw units by group: each module holding a matrix is a unit of its block (the layer's child it
    lies under: self_attn, mlp); modules of 1-D parameters only (the norms) are units of `NORM_GROUP`.
    `params`: name relative to the layer -> full name; `dims`: full name -> number of dimensions."""
    units: dict[str, list[str]] = {}
    for rel, full in params.items():
        units.setdefault(owner(rel) or rel, []).append(full)
    groups: dict[str, list[list[str]]] = {}
    for module, names in units.items():
        group = module.split(".", 1)[0] if any(dims[n] >= 2 for n in names) else NORM_GROUP
        groups.setdefault(group, []).append(names)
    return groups


def generator(seed: int, stage: int, draw: int) -> torch.Generator:
    """The draw's own generator, a pure function of (run seed, stage index, redraw count): a resume or another
    rank draws the same halves without any saved state."""
    digest = hashlib.sha256(f"hft:{seed}:{stage}:{draw}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def frozen_counts(sizes: list[int], odd: str, gen: torch.Generator) -> list[int]:
    """How many units to freeze in each layer's copy of one group, given its unit counts. Even n: n/2. Odd n:
    floor (n-1)/2, ceil (n+1)/2, random a fair coin per layer, balanced (the paper's feed-forward rule) the ceiling
    in a random half of the layers (with an odd number of layers, a coin decides the middle one) and the floor in
    the rest, so that over the model exactly half are frozen whenever that is possible."""
    counts = [n // 2 for n in sizes]
    odd_layers = [i for i, n in enumerate(sizes) if n % 2]
    if odd == "ceil":
        up = odd_layers
    elif odd == "random":
        up = [i for i in odd_layers if torch.rand((), generator=gen) < 0.5]
    elif odd == "balanced":
        k = len(odd_layers) // 2
        if len(odd_layers) % 2 and torch.rand((), generator=gen) < 0.5:
            k += 1
        up = [odd_layers[j] for j in torch.randperm(len(odd_layers), generator=gen)[:k].tolist()]
    else:
        up = []
    for i in up:
        counts[i] += 1
    return counts


def draw_frozen(groups: list[dict[str, list[list[str]]]], odd: str, norms: str, gen: torch.Generator) -> list[str]:
    """The full names of the parameters to freeze: in every layer and group, a random `frozen_counts` of its units
    (norms per `norms`). Groups are visited in a fixed order, so one generator gives one draw."""
    frozen: list[str] = []
    for name in sorted({g for layer in groups for g in layer}):
        present = [layer[name] for layer in groups if name in layer]
        if name == NORM_GROUP and norms != "half":
            frozen += [n for units in present for unit in units for n in unit] if norms == "freeze" else []
            continue
        for units, k in zip(present, frozen_counts([len(u) for u in present], odd, gen)):
            frozen += [n for j in torch.randperm(len(units), generator=gen)[:k].tolist() for n in units[j]]
    return frozen


class HFT(Strategy):
    """Freezes a random half of each decoder layer's matrices (per block), redrawn every stage (Hui et al. 2024, arXiv 2404.18466)."""

    name = "hft"  # the registry name: conf/strategy/hft.yaml
    Config = HFTConfig
    shardable = True  # whole tensors frozen: all-True masks on whatever part of a parameter this rank holds

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        layers = decoder_layers(list(ctx.named_params), self.cfg.layers, "strategy.layers")
        dims = {n: p.dim() for n, p in ctx.named_params.items()}
        self.groups = [layer_groups(params, dims) for params in layers.params.values()]
        self.outside = layers.outside
        self.stage, self.stage_start, self.stage_end = 0, 0, 0
        return stages

    def on_stage_start(self, index: int, stage: Stage, step: int) -> None:
        self.stage, self.stage_start, self.stage_end = index, step, step + stage.steps
        self.redraw(step, 0, stage.name)

    def after_step(self, step: int) -> None:
        every = self.cfg.redraw_every
        if every and step < self.stage_end and (step - self.stage_start) % every == 0:
            self.redraw(step, (step - self.stage_start) // every, None)

    def redraw(self, step: int, draw: int, stage_name: str | None) -> None:
        """Freeze this stage's (and redraw's) half; log the frozen fraction."""
        frozen = draw_frozen(self.groups, self.cfg.odd, self.cfg.norms, generator(self.ctx.seed, self.stage, draw))
        if self.cfg.others == "freeze":
            frozen += self.outside
        stats = freeze_whole(self.ctx, frozen)
        self.ctx.log(step, "mask", {**stats, "frozen_tensors": len(frozen), "stage": self.stage, "draw": draw})
        if stage_name is not None:
            self.ctx.info(f"hft: stage {self.stage} ({stage_name}): {len(frozen)} of {len(self.ctx.named_params)} tensors frozen "
                          f"({stats['isolated_fraction']:.2%} of the parameters)")

    def state_dict(self) -> dict[str, Any]:
        """Where the current stage began and ends: a resume inside a stage has no `on_stage_start` to tell it, and
        the redraw schedule counts from there (the masks themselves come back with the engine's state)."""
        return {"stage": self.stage, "stage_start": self.stage_start, "stage_end": self.stage_end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage, self.stage_start, self.stage_end = state["stage"], state["stage_start"], state["stage_end"]
