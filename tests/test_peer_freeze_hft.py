"""The two static peer baselines inside the real training loop: LLaMA-Factory's freeze tuning (`strategy=freeze`)
and Half Fine-Tuning (`strategy=hft`). Each rule is checked by the exact set it must give, and frozen means
bit-identical under weight decay."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from epi.errors import UserError
from epi.logging import read_metrics
from epi.strategies import registry
from epi.strategies.__main__ import description, main
from epi.strategies.hft import frozen_counts, generator
from epi.trainer import Trainer
from tests.helpers import crash_and_resume, make_cfg

LAYERS = 4
FOUR = [f"model.num_layers={LAYERS}"]
MOVING = ["optimizer.weight_decay=0.5", "optimizer.lr=1e-2"]  # a frozen tensor would drift under decay and momentum
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
OUTSIDE = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
TWO_STAGES = "schedule.stages=[{name: a, tasks: [math], steps: 4}, {name: b, tasks: [code], steps: 4}]"


def layer(i: int, *kinds: str) -> set[str]:
    """The full parameter names of layer i's modules of the given kinds (self_attn, mlp, or a norm's name)."""
    names = {"self_attn": [f"self_attn.{m}" for m in ATTN], "mlp": [f"mlp.{m}" for m in FFN]}
    return {f"model.layers.{i}.{m}.weight" for kind in kinds for m in names.get(kind, [kind])}


def every(i: int) -> set[str]:
    return layer(i, "self_attn", "mlp", *NORMS)


def trainable(trainer: Trainer) -> set[str]:
    """The parameters the engine lets move; a strategy of whole-tensor freezing leaves no partial mask."""
    masks = trainer.optimizer.masks
    assert all(bool(m.all()) for m in masks.values()), "a mask froze part of a tensor"
    return set(trainer.named_params) - set(masks)


def trainer_for(tmp_path: Path, *overrides: str) -> Trainer:
    return Trainer(make_cfg(*FOUR, "schedule.steps=1", *overrides), tmp_path)


# ---------------------------------------------------------------- freeze
@pytest.mark.parametrize(("n", "modules", "extra", "expected"), [
    (2, "[all]", "[]", every(2) | every(3)),                                            # LLaMA-Factory's default: the last two
    (-1, "[all]", "[]", every(0)),                                                      # negative: the first |n|
    (1, "[mlp]", "[embed_tokens,lm_head]", layer(3, "mlp") | {"model.embed_tokens.weight", "lm_head.weight"}),
    (3, "[self_attn]", "[norm]", layer(1, "self_attn") | layer(2, "self_attn") | layer(3, "self_attn") | {"model.norm.weight"}),
    (9, "[all]", "[]", set().union(*map(every, range(LAYERS)))),                       # more than there are: all of them
    (0, "[all]", "[model.norm]", {"model.norm.weight"}),                               # extras alone, by full path
])
def test_freeze_trains_exactly_the_chosen_tensors(tmp_path: Path, n: int, modules: str, extra: str, expected: set[str]) -> None:
    trainer = trainer_for(tmp_path, "strategy=freeze", f"strategy.freeze_trainable_layers={n}",
                          f"strategy.freeze_trainable_modules={modules}", f"strategy.freeze_extra_modules={extra}")
    assert trainable(trainer) == expected  # `norm` is the final norm only, not every layer's *_layernorm


@pytest.mark.parametrize(("override", "says"), [
    ("strategy.freeze_trainable_modules=[mlpx]", r"strategy\.freeze_trainable_modules: 'mlpx' selects no parameter.*mlp"),
    ("strategy.freeze_extra_modules=[head]", r"strategy\.freeze_extra_modules: 'head' matches no parameter.*lm_head"),
    ("strategy.layers=model.blocks", r"strategy\.layers='model\.blocks': no parameter lies under.*model\.layers"),
    ("strategy.freeze_trainable_layers=0", r"strategy\.freeze_trainable_layers=0 .* trains nothing"),
])
def test_freeze_refuses_a_selection_of_nothing_in_one_line(tmp_path: Path, override: str, says: str) -> None:
    with pytest.raises(UserError, match=says) as error:
        trainer_for(tmp_path, "strategy=freeze", override)
    assert "\n" not in str(error.value)


def test_freeze_frozen_tensors_bit_identical_under_weight_decay(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*FOUR, *MOVING, "schedule.steps=4", "strategy=freeze", "strategy.freeze_trainable_layers=1",
                               "strategy.freeze_trainable_modules=[mlp]", "strategy.freeze_extra_modules=[norm]"), tmp_path)
    start = {n: p.detach().clone() for n, p in trainer.named_params.items()}
    trained = trainable(trainer)
    assert trained == layer(3, "mlp") | {"model.norm.weight"}
    trainer.fit()
    for name, p in trainer.named_params.items():
        assert torch.equal(p.detach(), start[name]) != (name in trained), f"{name}: {'frozen but moved' if name not in trained else 'trained but still'}"
    logged = {e["metric"]: e["value"] for e in read_metrics(tmp_path) if e["split"] == "mask"}
    numels = {n: p.numel() for n, p in trainer.named_params.items()}
    frozen = sum(v for n, v in numels.items() if n not in trained) / sum(numels.values())
    assert logged["isolated_fraction"] == pytest.approx(frozen) and logged["frozen_tensors"] == len(numels) - len(trained)


# ---------------------------------------------------------------- HFT
def test_odd_counts_round_by_the_rule() -> None:
    """floor/ceil fixed; balanced: the ceiling in exactly half of the layers (a coin for the middle one of an odd
    number); random: a coin per layer; even counts are halved whatever the rule."""
    gen = torch.Generator().manual_seed(0)
    assert frozen_counts([3, 3, 4, 2], "floor", gen) == [1, 1, 2, 1]
    assert frozen_counts([3, 3, 4, 2], "ceil", gen) == [2, 2, 2, 1]
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        balanced = frozen_counts([3] * 6, "balanced", gen)
        assert sorted(balanced) == [1, 1, 1, 2, 2, 2]
        five = frozen_counts([3] * 5, "balanced", gen)
        assert set(five) <= {1, 2} and five.count(2) in (2, 3)
        assert set(frozen_counts([3] * 8, "random", gen)) <= {1, 2}
    draws = {tuple(frozen_counts([3] * 8, "balanced", torch.Generator().manual_seed(s))) for s in range(10)}
    assert len(draws) > 1  # which layers round up is drawn, not fixed


def test_the_draw_is_a_function_of_seed_stage_and_redraw() -> None:
    def perm(*key: int) -> list[int]:
        return torch.randperm(50, generator=generator(*key)).tolist()

    assert perm(0, 1, 0) == perm(0, 1, 0)
    assert len({tuple(perm(*key)) for key in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1)]}) == 4


def watch_stages(trainer: Trainer) -> list[dict]:
    """Per stage: the masks and the weights right after `on_stage_start`, and the weights at `on_stage_end`."""
    stages: list[dict] = []
    start, end = trainer.strategy.on_stage_start, trainer.strategy.on_stage_end

    def on_start(index, stage, step):
        start(index, stage, step)
        stages.append({"masks": trainer.optimizer.masks, "start": {n: p.detach().clone() for n, p in trainer.named_params.items()}})

    def on_end(index, stage, step):
        stages[index]["end"] = {n: p.detach().clone() for n, p in trainer.named_params.items()}
        end(index, stage, step)

    trainer.strategy.on_stage_start, trainer.strategy.on_stage_end = on_start, on_end
    return stages


def test_hft_freezes_half_of_each_block_per_stage_and_holds_it(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*FOUR, *MOVING, "strategy=hft", TWO_STAGES), tmp_path)
    stages = watch_stages(trainer)
    trainer.fit()
    assert len(stages) == 2
    for s in stages:
        frozen = set(s["masks"])
        assert all(bool(m.all()) for m in s["masks"].values())
        assert not frozen & OUTSIDE  # others: train
        for i in range(LAYERS):
            assert len(frozen & layer(i, "self_attn")) == 2, f"layer {i}: two of q, k, v, o"
            assert len(frozen & layer(i, *NORMS)) == 1, f"layer {i}: one of its two norms"
        ffn = [len(frozen & layer(i, "mlp")) for i in range(LAYERS)]
        assert sorted(ffn) == [1, 1, 2, 2], f"balanced: 2 of 3 in half the layers, 1 in the rest, got {ffn}"
        for name, before in s["start"].items():
            held = torch.equal(s["end"][name], before)
            assert held == (name in frozen), f"{name}: {'frozen but moved' if name in frozen else 'trained but still'}"
    assert set(stages[0]["masks"]) != set(stages[1]["masks"])  # redrawn at the second stage
    fractions = [e["value"] for e in read_metrics(tmp_path) if e["split"] == "mask" and e["metric"] == "isolated_fraction"]
    assert len(fractions) == 2 and all(0.2 < f < 0.6 for f in fractions)


def test_hft_keys_that_freeze_more(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "strategy=hft", "strategy.odd=ceil", "strategy.norms=freeze", "strategy.others=freeze")
    assert trainable(trainer) == set(trainer.named_params)  # nothing is drawn before the first stage starts
    trainer.strategy.on_stage_start(0, trainer.stages[0], 0)
    frozen = set(trainer.named_params) - trainable(trainer)
    assert OUTSIDE <= frozen
    for i in range(LAYERS):
        assert layer(i, *NORMS) <= frozen
        assert len(frozen & layer(i, "mlp")) == 2 and len(frozen & layer(i, "self_attn")) == 2


@pytest.mark.slow  # three runs of two stages, each evaluated
@pytest.mark.parametrize("redraw", ["null", "2"])  # 2: a redraw inside stage b, at step 4, right before the checkpoint
def test_hft_resume_mid_stage_is_exact(tmp_path: Path, redraw: str) -> None:
    stages = "schedule.stages=[{name: a, tasks: [math], steps: 2}, {name: b, tasks: [code], steps: 3}]"
    common = [*FOUR, *MOVING, "strategy=hft", stages, f"strategy.redraw_every={redraw}", "schedule.checkpoint_every=4",
              "eval.n_examples=1", "eval.max_new_tokens=2"]
    straight, resumed, state = crash_and_resume(tmp_path, common, crash_at=5)
    assert state["step"] == 4  # inside stage b (steps 3-5): the resume has no on_stage_start to redraw
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    a, b = straight.optimizer.masks, resumed.optimizer.masks
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    draws = {e["value"] for e in read_metrics(tmp_path / "straight") if e["split"] == "mask" and e["metric"] == "draw"}
    assert draws == ({0} if redraw == "null" else {0, 1})


# ---------------------------------------------------------------- the listing
def test_strategies_cli_lists_both_with_citation_and_defaults(capsys: pytest.CaptureFixture) -> None:
    assert main() == 0
    table = {block.split(None, 1)[0]: block for block in capsys.readouterr().out.split("\n\n")[1:]}
    assert re.search(r"\(LLaMA-Factory finetuning_type: freeze\)\.?$", description(registry["freeze"]))
    assert re.search(r"\(Hui et al\. 2024, arXiv 2404\.18466\)\.?$", description(registry["hft"]))
    assert "_target_: epi.strategies.freeze.Freeze" in table["freeze"] and "freeze_trainable_layers=2" in table["freeze"]
    assert "freeze_trainable_modules=[\"all\"]" in table["freeze"]
    assert "_target_: epi.strategies.hft.HFT" in table["hft"] and "odd=balanced" in table["hft"] and "others=train" in table["hft"]
