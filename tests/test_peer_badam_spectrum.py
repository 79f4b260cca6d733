"""BAdam and Spectrum inside the real training loop: each rule checked against an independent statement of it, and
frozen means bit-identical under weight decay."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epi.errors import UserError
from epi.logging import read_metrics
from epi.strategies import build_strategy
from epi.strategies.badam import BAdam, BlockSchedule, infer_blocks
from epi.strategies.spectrum import snr
from epi.trainer import Trainer
from tests.helpers import ROOT, crash_and_resume, make_cfg

# Four decoder layers, two steps per block, weight decay and a learning rate large enough that anything not held moves.
BADAM_FAST = ["strategy=badam", "model.num_layers=4", "strategy.switch_every=2", "schedule.steps=10",
              "optimizer.weight_decay=0.5", "optimizer.lr=1e-2"]
SPECTRUM_FAST = ["strategy=spectrum", "model.num_layers=4", "schedule.steps=4", "optimizer.weight_decay=0.5", "optimizer.lr=1e-2"]
LAYERS = 4


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


class WatchedBAdam(BAdam):
    """Real BAdam that records, after every step, which tensors moved in it and, on the first step of each block
    period, every parameter's optimizer state."""

    def prepare(self, ctx, stages):
        stages = super().prepare(ctx, stages)
        self.before = snapshot(ctx.named_params)
        self.moved: list[set[str]] = []
        self.first_states: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        return stages

    def after_step(self, step: int) -> None:
        params = self.ctx.named_params
        self.moved.append({n for n, p in params.items() if not torch.equal(p.detach(), self.before[n])})
        if (step - 1) % self.cfg.switch_every == 0:
            self.first_states[step] = {n: {k: v.clone() for k, v in self.ctx.optimizer_state(n).items()} for n in params}
        super().after_step(step)
        self.before = snapshot(params)


def watched_badam(tmp_path: Path, *extra: str) -> Trainer:
    trainer = Trainer(make_cfg(*BADAM_FAST, "strategy._target_=tests.test_peer_badam_spectrum.WatchedBAdam", *extra), tmp_path)
    trainer.fit()
    return trainer


def layer_params(trainer: Trainer, layer: int) -> set[str]:
    return {n for n in trainer.named_params if n.startswith(f"model.layers.{layer}.")}


# ------------------------------------------------------------------ BAdam


@pytest.mark.parametrize(("mode", "expected"), [
    ("ascending", [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]),
    ("descending", [3, 3, 2, 2, 1, 1, 0, 0, 3, 3]),
])
def test_badam_only_the_active_layer_moves_each_step_in_switch_order(tmp_path: Path, mode: str, expected: list[int]) -> None:
    """Every step moves every tensor of exactly one layer, the one the switch order names, and nothing else:
    embeddings, final norm and head (not blocks by default) and the other layers stay bit-identical under
    weight decay 0.5."""
    trainer = watched_badam(tmp_path, f"strategy.switch_mode={mode}")
    moved = trainer.strategy.moved
    assert len(moved) == len(expected)
    for step, (got, layer) in enumerate(zip(moved, expected), start=1):
        assert got == layer_params(trainer, layer), f"step {step}: moved {sorted(got)}, expected layer {layer}"
    switches = [(e["step"], e["value"]) for e in read_metrics(tmp_path) if e["split"] == "mask" and e["metric"] == "active_block"]
    assert switches == [(0, expected[0]), (2, expected[2]), (4, expected[4]), (6, expected[6]), (8, expected[8])]


@pytest.mark.slow
def test_badam_random_order_is_a_fresh_permutation_per_round(tmp_path: Path) -> None:
    trainer = watched_badam(tmp_path, "strategy.switch_mode=random", "schedule.steps=8", "strategy.switch_every=1")
    layers = [next(layer for layer in range(LAYERS) if got == layer_params(trainer, layer)) for got in trainer.strategy.moved]
    rounds = [layers[i:i + LAYERS] for i in range(0, 8, LAYERS)]
    assert all(sorted(r) == list(range(LAYERS)) for r in rounds), rounds  # each round trains every layer once
    same_seed = BlockSchedule(LAYERS, 1, "random", None, seed=trainer.cfg.seed)
    assert layers == [same_seed.block(s) for s in range(1, 9)]  # a pure function of (seed, step)
    many = BlockSchedule(LAYERS, 1, "random", None, seed=0)
    orders = {tuple(many.permutation(r)) for r in range(20)}
    assert len(orders) > 1  # redrawn each round, not one permutation repeated


def test_badam_fixed_mode_trains_one_block_and_start_block_shifts_the_order() -> None:
    assert [BlockSchedule(LAYERS, 2, "fixed", 2, seed=0).block(s) for s in range(1, 9)] == [2] * 8
    assert [BlockSchedule(LAYERS, 2, "ascending", 3, seed=0).block(s) for s in range(1, 7)] == [3, 3, 0, 0, 1, 1]
    assert [BlockSchedule(LAYERS, 3, "descending", 1, seed=0).block(s) for s in range(1, 8)] == [1, 1, 1, 0, 0, 0, 3]


def adam_restarted(state: dict[str, torch.Tensor], betas: tuple[float, float]) -> bool:
    """Whether `state` is AdamW's after exactly one step from a fresh start: step count 1, and m = (1-b1) g with
    v = (1-b2) g^2, so m^2 / v = (1-b1)^2 / (1-b2) wherever g != 0, whatever g was."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    nonzero = v > 0
    ratio = m[nonzero].double() ** 2 / v[nonzero].double()
    fresh = (1 - betas[0]) ** 2 / (1 - betas[1])
    return float(state["step"]) == 1 and bool(nonzero.any()) and torch.allclose(ratio, torch.full_like(ratio, fresh), rtol=1e-4)


@pytest.mark.parametrize("mode", ["ascending", "fixed"])
def test_badam_resets_the_active_blocks_adam_state_at_every_switch(tmp_path: Path, mode: str) -> None:
    """BlockOptimizer empties the optimizer state at every switch, in fixed mode too: on the first step of each
    block period the active block's AdamW state is that of a single step from zero; the frozen blocks' state
    (tracked by the engine) is older."""
    extra = ["strategy.switch_mode=fixed", "strategy.start_block=1"] if mode == "fixed" else []
    trainer = watched_badam(tmp_path, *extra)
    betas = tuple(trainer.cfg.optimizer.betas)
    schedule = trainer.strategy.schedule
    starts = sorted(trainer.strategy.first_states)
    assert starts == [1, 3, 5, 7, 9]
    for step in starts:
        states = trainer.strategy.first_states[step]
        active = layer_params(trainer, schedule.block(step))
        assert all(adam_restarted(states[n], betas) for n in active), f"step {step}: active block's state not fresh"
        for name, state in states.items():  # a frozen tensor's state counts every step since its block last restarted
            restarted = [s for s in starts if s <= step and name in layer_params(trainer, schedule.block(s))]
            assert float(state["step"]) == step - (restarted[-1] - 1 if restarted else 0), (step, name)


def test_badam_keeps_adam_state_when_reset_is_off(tmp_path: Path) -> None:
    """The control: without the reset, the block that becomes active at step 3 carries three steps of state."""
    trainer = watched_badam(tmp_path, "strategy.reset_state=false")
    states = trainer.strategy.first_states[3]
    assert all(float(states[n]["step"]) == 3 for n in layer_params(trainer, 1))
    assert not any(adam_restarted(states[n], tuple(trainer.cfg.optimizer.betas)) for n in layer_params(trainer, 1))


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_at", [3, 4])
def test_badam_resume_is_exact(tmp_path: Path, checkpoint_at: int) -> None:
    """Killed after step 5 and resumed from the checkpoint at step 3 (mid-block) or 4 (right after a switch, the new
    block's state just emptied): bit-identical weights, masks and optimizer state to the straight run."""
    common = [*BADAM_FAST, "schedule.steps=6", f"schedule.checkpoint_every={checkpoint_at}"]
    straight, resumed, state = crash_and_resume(tmp_path, common, 5)
    assert state["step"] == checkpoint_at
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    a, b = straight.optimizer.masks, resumed.optimizer.masks
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for name in straight.named_params:
        mine, theirs = straight.context.optimizer_state(name), resumed.context.optimizer_state(name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name


def test_badam_refuses_what_upstream_cannot_run() -> None:
    with pytest.raises(UserError, match="start_block"):
        build_strategy(make_cfg("strategy=badam", "strategy.switch_mode=random", "strategy.start_block=1").strategy)
    with pytest.raises(UserError, match="start_block"):
        build_strategy(make_cfg("strategy=badam", "strategy.switch_mode=fixed").strategy)


def test_badam_blocks_follow_block_optimizers_grouping() -> None:
    """One block per layer in model order; the embeddings a block of their own only with include_embedding; the
    rest (final norm, head) one last block only with include_lm_head, which then also takes the embeddings
    when they are not a block (upstream's grouping)."""
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.{k}.weight" for i in range(2) for k in ("self_attn.q_proj", "mlp.up_proj")),
             "model.norm.weight", "lm_head.weight"]

    def grouped(embedding: bool, head: bool) -> list[tuple[str, tuple[str, ...]]]:
        return [(b.name, b.params) for b in infer_blocks(names, embedding, head)]

    layers = [(f"model.layers.{i}", (f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.up_proj.weight")) for i in range(2)]
    assert grouped(False, False) == layers
    assert grouped(True, False) == [("model.embed_tokens", ("model.embed_tokens.weight",)), *layers]
    assert grouped(True, True) == [("model.embed_tokens", ("model.embed_tokens.weight",)), *layers,
                                   ("head+rest", ("model.norm.weight", "lm_head.weight"))]
    assert grouped(False, True) == [*layers, ("head+rest", ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"))]


# ------------------------------------------------------------------ Spectrum


def reference_snr(weight: torch.Tensor) -> float:
    """The scanner's formula written out independently, in float64."""
    w = weight.double()
    w = w.unsqueeze(0) if w.ndim == 1 else w
    s = torch.linalg.svdvals(w)
    q25, q75 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=torch.float64))
    sigma = (q75 - q25) / 1.349
    rows, cols = w.shape
    edge = sigma * (1 + math.sqrt(min(rows, cols) / max(rows, cols)))
    signal, noise = s[s > edge].sum(), s[s <= edge].sum()
    noise = noise if (s <= edge).any() else torch.tensor(1.0, dtype=torch.float64)
    return float(signal / noise / s.max())


def test_snr_matches_an_independent_computation() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(48, 80, generator=g)
    low_rank = torch.randn(48, 3, generator=g) @ torch.randn(3, 80, generator=g)
    for weight in (noise, 0.2 * noise + low_rank, (0.2 * noise + low_rank).T):
        assert snr(weight) == pytest.approx(reference_snr(weight), rel=1e-5)
    # By hand: S = 8, 4, 3, 2, 1; quartiles 2 and 4, sigma = 2 / 1.349, edge = 2 sigma = 2.97 (square: beta = 1);
    # signal 8 + 4 + 3 = 15, noise 2 + 1 = 3, SNR = (15 / 3) / 8.
    assert snr(torch.diag(torch.tensor([8.0, 4.0, 3.0, 2.0, 1.0]))) == pytest.approx(0.625, rel=1e-6)
    structured = 0.2 * noise + low_rank
    assert snr(3 * structured) == pytest.approx(snr(structured) / 3, rel=1e-5)  # upstream divides by the top singular value
    assert snr(torch.full((32,), 2.0)) == 1.0  # a 1-D weight: one singular value, all signal, noise counted as 1.0


def expected_trainable(initial: dict[str, torch.Tensor], fraction: float) -> set[str]:
    """Per module type (the name after the layer index), the floor(count * fraction) layers of highest SNR by the
    reference formula, ties in model order, plus lm_head and embed_tokens."""
    by_type: dict[str, list[tuple[str, float]]] = {}
    for name, weight in initial.items():
        module = name.removesuffix(".weight")
        parts = module.split(".")
        kind = ".".join(parts[3:]) if parts[:2] == ["model", "layers"] else module
        by_type.setdefault(kind, []).append((name, reference_snr(weight)))
    chosen = {"lm_head.weight", "model.embed_tokens.weight"}
    for members in by_type.values():
        ranked = sorted(members, key=lambda x: -x[1])
        k = int(len(members) * fraction)
        chosen |= {name for name, _ in ranked[:k]}
        if 0 < k < len(ranked) and ranked[k - 1][1] != ranked[k][1]:  # a real gap, so float32 and float64 rank alike
            assert ranked[k - 1][1] - ranked[k][1] > 1e-4 * abs(ranked[k][1])
    return chosen


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_spectrum_trains_exactly_the_top_fraction_per_type_and_holds_the_rest(tmp_path: Path, fraction: float) -> None:
    trainer = Trainer(make_cfg(*SPECTRUM_FAST, f"strategy.top_fraction={fraction}"), tmp_path)
    initial = snapshot(trainer.named_params)
    trainable = set(trainer.named_params) - set(trainer.optimizer.masks)
    assert trainable == expected_trainable(initial, fraction)
    assert set(trainer.strategy.trainable) == trainable
    per_type = sum(1 for n in trainable if n.startswith("model.layers.") and n.endswith(".mlp.down_proj.weight"))
    assert per_type == int(LAYERS * fraction)
    trainer.fit()
    for name, param in trainer.named_params.items():
        same = torch.equal(param.detach(), initial[name])
        assert same != (name in trainable), f"{name}: {'did not move' if same else 'moved'}"
    frozen = next(e["value"] for e in read_metrics(tmp_path) if e["split"] == "mask" and e["metric"] == "isolated_fraction")
    numels = {n: p.numel() for n, p in trainer.named_params.items()}
    assert frozen == pytest.approx(sum(v for n, v in numels.items() if n not in trainable) / sum(numels.values()))


def test_spectrum_module_types_restrict_the_ranking(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*SPECTRUM_FAST, "strategy.module_types=[mlp.down_proj]", "strategy.always_train=[]"), tmp_path)
    trainable = set(trainer.named_params) - set(trainer.optimizer.masks)
    assert len(trainable) == LAYERS // 2 and all(n.endswith("mlp.down_proj.weight") for n in trainable)
    (tmp_path / "bad").mkdir()
    with pytest.raises(UserError, match="not module types"):
        Trainer(make_cfg(*SPECTRUM_FAST, "strategy.module_types=[mlp.nonexistent]"), tmp_path / "bad")


# ------------------------------------------------------------------ registry


@pytest.mark.slow  # the CLI over every strategy module; tests/test_package.py lists every built-in in the inner loop
def test_both_listed_by_the_registry() -> None:
    """`python -m epi.strategies` lists both, each with its one-line description ending in its citation."""
    proc = subprocess.run([sys.executable, "-m", "epi.strategies"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    blocks = {block.split()[0]: " ".join(block.split()) for block in proc.stdout.split("\n\n") if block.strip()}
    assert "(Luo et al. 2024, arXiv 2404.02827). _target_: epi.strategies.badam.BAdam" in blocks["badam"]
    assert "(Hartford et al. 2024, arXiv 2406.06623). _target_: epi.strategies.spectrum.Spectrum" in blocks["spectrum"]
    assert "switch_every=50" in blocks["badam"] and "top_fraction=0.5" in blocks["spectrum"]
