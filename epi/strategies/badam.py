"""`strategy=badam`: BAdam, Adam on one block of layers at a time (Luo et al. 2024, arXiv 2404.02827).

BAdam is block coordinate descent with Adam as the inner solver: the model is cut into blocks (one per decoder
layer), only the active block trains, for K = `switch_every` optimizer steps, then the next block in the switch
order takes over. As a parameter isolation method it is the opposite of a few protected coordinates: at any
step nearly everything is frozen, and which part moves rotates on a fixed schedule.

What follows is read from the reference code, Ledzy/BAdam `src/badam/block_optim.py` (`BlockOptimizer`, commit
bf989dc) and LLaMA-Factory's `use_badam` (`src/llamafactory/train/trainer_utils.py::_create_badam_optimizer` and
`hparams/finetuning_args.py::BAdamArgument`, commit ff6d4d1):

- Blocks (`BlockOptimizer.infer_param_groups`): one per `<...>layers.<i>.` prefix, in model order. Embeddings
  (`<...>embed*.`) form their own block only with `include_embedding`; everything else (final norm, LM head)
  forms one last block only with `include_lm_head`; otherwise they never train. LLaMA-Factory passes neither,
  so there embeddings, final norm and head stay frozen for the whole run. Upstream quirk kept: with
  `include_lm_head` and without `include_embedding` the embeddings join that last "head and the rest" block.
- Order (`_update_active_block_idx`): ascending 0, 1, ..., n-1, 0, ...; descending n-1, ..., 0, n-1, ...;
  random: a fresh uniform random permutation of the blocks per round of n periods; fixed: the same block all
  run. `start_block` replaces the first block (ascending/descending/fixed).
- Adam state: at every switch `BlockOptimizer.switch_trainable_params` replaces the base optimizer's whole state
  with an empty one, so each block starts from m = v = 0 and step = 0 (bias correction restarts). It does this in
  `fixed` mode too: the one block's state is cleared every K steps. Here the newly active block's state dicts
  are emptied through `Context.optimizer_state` at the switch (`reset_state: true`), which makes the next step
  re-initialise them exactly as a fresh optimizer would; `reset_state: false` is an ablation that keeps them.

This implementation keeps the full AdamW state for every parameter (the isolation engine tracks frozen ones;
`isolation.moments`) and computes every gradient: BAdam's memory and backward-time savings are not reproduced,
only its update rule. Frozen blocks are held by the engine bit for bit (weight decay and momentum included), and
their gradients are hidden before clipping, so the clip norm is the active block's, as in BAdam where only the
active block has gradients.

Deviations, on purpose:
- Every block gets exactly K steps, as in the paper's Algorithm 1. `BlockOptimizer.step` switches when
  `(global_step + 1) % K == 0` after incrementing `global_step`, so upstream the first block gets K-1 steps and
  later blocks K.
- The random order is drawn from a generator seeded with the run's seed (round r: the r-th permutation it
  draws), not from torch's global RNG: the schedule is a pure function of (seed, step), so a resumed run
  continues it exactly without saving it.
- `start_block` with `switch_mode: random` is refused (upstream leaves its permutation uninitialised and fails
  at the first switch), and `switch_mode: fixed` needs `start_block` (upstream has no default block for it).
- Weight decay follows this project's optimizer config (matrices decay, norms and biases do not). Upstream
  rebuilds the base optimizer's parameter groups at each switch from the wrapped optimizer's defaults, so the
  decay LLaMA-Factory effectively applies may differ from its `weight_decay` setting.
- LLaMA-Factory's `badam_mode: ratio` (`BlockOptimizerRatio`, a sparse random subset of every matrix) is not
  implemented; this is `badam_mode: layer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from epi.errors import UserError
from epi.schema import Schema, at_least
from epi.strategies.base import Context, Stage, Strategy, freeze_whole

SWITCH_MODES = ("ascending", "descending", "random", "fixed")
# BlockOptimizer.infer_param_groups' patterns (`.*layers.[^.]*\.`, `.*embed[^.]*\.`), dots literal, the prefix grouped.
_LAYER = re.compile(r"^(.*layers\.[^.]+)\.")
_EMBED = re.compile(r"^(.*embed[^.]*)\.")
REST = "head+rest"  # the name of the last block (`include_lm_head`): every parameter in no other block


@dataclass
class BAdamConfig(Schema):
    """BAdam's keys; defaults: conf/strategy/badam.yaml (LLaMA-Factory's)."""

    switch_every: Annotated[int, at_least(1, "optimizer steps per block")]
    switch_mode: Literal[SWITCH_MODES]
    start_block: Annotated[int, at_least(0)] | None
    include_embedding: bool
    include_lm_head: bool
    reset_state: bool

    def check(self, key: str) -> None:
        if self.switch_mode == "random" and self.start_block is not None:
            raise UserError(f"{key}.start_block={self.start_block} with {key}.switch_mode=random: the random order draws "
                            f"every block, the first included; set {key}.start_block=null")
        if self.switch_mode == "fixed" and self.start_block is None:
            raise UserError(f"{key}.switch_mode=fixed trains one block all run: name it with {key}.start_block=<index>")


@dataclass(frozen=True)
class Block:
    """One block: its name (a module prefix such as model.layers.3) and its parameters' names."""

    name: str
    params: tuple[str, ...]


def infer_blocks(names: list[str], include_embedding: bool, include_lm_head: bool) -> list[Block]:
    """BAdam's blocks from parameter names, in model order: one per decoder layer, the embeddings' if
    `include_embedding`, and one last block of every remaining parameter if `include_lm_head`; a parameter
    in no block never trains."""
    grouped: dict[str, list[str]] = {}
    rest: list[str] = []
    for name in names:
        match = _LAYER.match(name) or (_EMBED.match(name) if include_embedding else None)
        if match:
            grouped.setdefault(match.group(1), []).append(name)
        else:
            rest.append(name)
    blocks = [Block(prefix, tuple(params)) for prefix, params in grouped.items()]
    if include_lm_head and rest:
        blocks.append(Block(REST, tuple(rest)))
    return blocks


class BlockSchedule:
    """Which block trains at each step: a pure function of (seed, step), so nothing of it needs saving.

    Period r = (step - 1) // every covers steps r*every+1 .. (r+1)*every (steps count from 1)."""

    def __init__(self, n_blocks: int, every: int, mode: str, start: int | None, seed: int):
        self.n, self.every, self.mode = n_blocks, every, mode
        self.start = start if start is not None else (n_blocks - 1 if mode == "descending" else 0)
        self._generator = torch.Generator().manual_seed(seed)
        self._rounds: list[list[int]] = []  # random mode: the permutation of each round, drawn in order

    def period(self, step: int) -> int:
        return (step - 1) // self.every

    def is_switch(self, step: int) -> bool:
        """Whether `step` is the last of its period, so the next step starts a block (a new or, `fixed`, the same one)."""
        return step % self.every == 0

    def block(self, step: int) -> int:
        """The index of the block that trains at `step`."""
        r = self.period(step)
        if self.mode == "ascending":
            return (self.start + r) % self.n
        if self.mode == "descending":
            return (self.start - r) % self.n
        if self.mode == "fixed":
            return self.start
        return self.permutation(r // self.n)[r % self.n]

    def permutation(self, round_index: int) -> list[int]:
        """Round `round_index`'s order in random mode: the generator's permutations are drawn in round order, so
        round r is always the r-th draw from the seed."""
        while len(self._rounds) <= round_index:
            self._rounds.append(torch.randperm(self.n, generator=self._generator).tolist())
        return self._rounds[round_index]


class BAdam(Strategy):
    """BAdam: only one decoder-layer block trains, for K steps each, in a switch order (Luo et al. 2024, arXiv 2404.02827)."""

    name = "badam"  # the registry name: conf/strategy/badam.yaml
    Config = BAdamConfig

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        names = list(ctx.named_params)
        self.blocks = infer_blocks(names, self.cfg.include_embedding, self.cfg.include_lm_head)
        if not self.blocks:
            raise UserError(f"strategy=badam: no decoder layer (a parameter named like model.layers.<i>.…) among the "
                            f"parameters {names[:3]}...; BAdam's blocks are the decoder layers")
        if self.cfg.start_block is not None and self.cfg.start_block >= len(self.blocks):
            raise UserError(f"strategy.start_block={self.cfg.start_block}: this model has {len(self.blocks)} blocks "
                            f"(0..{len(self.blocks) - 1}: {', '.join(b.name for b in self.blocks)})")
        self.schedule = BlockSchedule(len(self.blocks), self.cfg.switch_every, self.cfg.switch_mode, self.cfg.start_block, ctx.seed)
        self.total = sum(stage.steps for stage in stages)
        never = [n for n in names if not any(n in b.params for b in self.blocks)]
        periods = -(-self.total // self.cfg.switch_every)
        ctx.info(f"badam: {len(self.blocks)} blocks of {self.cfg.switch_every} steps, {self.cfg.switch_mode} order; "
                 f"{periods} block periods in {self.total} steps; never trained: {', '.join(never) or 'nothing'}")
        self.activate(1, logged_at=0)
        return stages

    def after_step(self, step: int) -> None:
        """At the end of a block period, the next step's block becomes the only one that moves."""
        if self.schedule.is_switch(step) and step < self.total:
            self.activate(step + 1, logged_at=step)

    @torch.no_grad()
    def activate(self, step: int, logged_at: int) -> None:
        """Makes the block that trains at `step` the only trainable one; with `reset_state`, its optimizer state is
        emptied so that its first step starts Adam afresh (m = v = 0, step count 0), as BAdam's switch does."""
        index = self.schedule.block(step)
        active = self.blocks[index]
        frozen = freeze_whole(self.ctx, [n for n in self.ctx.named_params if n not in active.params])["isolated_fraction"]
        if self.cfg.reset_state:
            for name in active.params:
                self.ctx.optimizer_state(name).clear()  # the live state dict: torch re-initialises it at the next step
        self.ctx.log(logged_at, "mask", {"isolated_fraction": frozen, "active_block": index})
        last = min(step + self.cfg.switch_every - 1, self.total)
        self.ctx.info(f"badam: steps {step}-{last}: block {index} ({active.name}) trains, {frozen:.2%} of the parameters frozen"
                      + (", its Adam state reset" if self.cfg.reset_state else ""))

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the schedule is a function of (seed, step) and the engine saves the masks and the optimizer state."""
        return {}
