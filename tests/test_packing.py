"""data.packing: a micro-batch's examples packed into rows of at most max_len tokens, with position ids restarting
per example and attention confined to it, give the loss and gradients of the same examples unpadded-and-separate,
leave isolation bit-exact, and keep exclusive isolation's rows one task's each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epi.data.format import IGNORE_INDEX, collate, pack, plan_rows
from epi.errors import UserError
from epi.logging import read_metrics
from epi.loss import CausalLMLoss
from epi.models import build_model
from epi.trainer import Trainer
from tests.helpers import EPI_FAST, Watched, make_cfg

# Examples of uneven lengths with prompt tokens (IGNORE_INDEX labels) and trained ones, as encode_task makes them.
LENGTHS = [(5, 4), (3, 9), (7, 2), (2, 3), (6, 6), (4, 1)]  # (prompt, response) tokens


def examples(vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, response in LENGTHS:
        ids = torch.randint(3, vocab, (prompt + response,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_plan_rows_packs_first_fit_decreasing() -> None:
    # first-fit decreasing at width 8 needs rows [6, 1] [4, 4] [3]: 3 x 8 cells; balanced at width 7: 3 x 7
    assert plan_rows([4, 4, 3, 6, 1], width=8) == [[3, 4], [0, 2], [1]]
    assert sorted(i for row in plan_rows([5, 3, 7, 1, 2, 6], width=8) for i in row) == list(range(6))  # each example once
    with pytest.raises(ValueError, match="does not fit"):
        plan_rows([9], width=8)


def test_plan_rows_balances_the_rows_so_the_last_one_is_not_left_part_empty() -> None:
    """16 examples of 20-60 tokens into rows of at most 128: first-fit alone leaves its last row part-empty."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(20, 61, (16,), generator=g).tolist()
        plan = plan_rows(lengths, 128)
        sums = [sum(lengths[i] for i in row) for row in plan]
        assert sorted(i for row in plan for i in row) == list(range(16)) and max(sums) <= 128
        assert 1 - sum(lengths) / (len(plan) * max(sums)) < 0.08, (lengths, plan)


def test_pack_restarts_positions_and_drops_each_examples_first_label() -> None:
    batch = examples(50)
    packed = pack(batch, plan_rows([len(x["input_ids"]) for x in batch], 20), pad_id=0)
    assert packed.keys() == {"input_ids", "position_ids", "labels"}  # no attention mask: the positions carry the boundaries
    padded = collate(batch, pad_id=0)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    starts = 0
    for row in packed["position_ids"].tolist():  # each example (and the padding) counts from 0 again
        assert row[0] == 0 and all(b == a + 1 or b == 0 for a, b in zip(row, row[1:]))
        starts += row.count(0)
    padded_rows = int((packed["input_ids"][:, -1] == 0).sum())
    assert len(batch) <= starts <= len(batch) + padded_rows
    # the same trained targets, in the same order: every label that is a target unpacked is one packed
    targets = lambda b: b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE_INDEX].tolist()  # noqa: E731
    assert sorted(targets(packed)) == sorted(targets(padded))
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()


def _loss_and_grads(model: torch.nn.Module, lm_head: str, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = CausalLMLoss(model, lm_head)(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lm_head", ["trained", "all"])
def test_packed_loss_and_gradients_equal_the_padded_ones_tiny(lm_head: str) -> None:
    model, tok = build_model(make_cfg(tiny=True).model)
    model.train()
    batch = examples(model.config.vocab_size)
    padded = _loss_and_grads(model, lm_head, collate(batch, tok.pad_token_id))
    packed = _loss_and_grads(model, lm_head, pack(batch, plan_rows([len(x["input_ids"]) for x in batch], 24), tok.pad_token_id))
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    for name, grad in padded[1].items():
        torch.testing.assert_close(packed[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_packed_loss_and_gradients_equal_the_padded_ones_smollm2() -> None:
    model, tok = build_model(make_cfg("model=smollm2_135m", tiny=False).model)
    model.train()
    batch = examples(model.config.vocab_size)
    padded = _loss_and_grads(model, "trained", collate(batch, tok.pad_token_id))
    packed = _loss_and_grads(model, "trained", pack(batch, plan_rows([len(x["input_ids"]) for x in batch], 24), tok.pad_token_id))
    assert packed[0] == pytest.approx(padded[0], rel=1e-4)
    for name, grad in padded[1].items():  # 135M parameters in float32: compared as a whole, relative to its size
        assert float((packed[1][name] - grad).norm() / grad.norm().clamp_min(1e-12)) < 1e-4, name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_example_attends_across_its_boundary(attention: str) -> None:
    """Changing one packed example's tokens changes no other example's logits (the ones after it included), under
    each attention that trains on a CPU (`model.attn_implementation`)."""
    model, tok = build_model(make_cfg(f"model.attn_implementation={attention}", tiny=True).model)
    assert model.config._attn_implementation == attention
    model.eval()
    batch = examples(model.config.vocab_size)
    packed = pack(batch, plan_rows([len(x["input_ids"]) for x in batch], 64), tok.pad_token_id)  # one row: all six
    assert packed["input_ids"].shape[0] == 1
    changed = [dict(x) for x in batch]
    changed[2] = {"input_ids": [t % (model.config.vocab_size - 3) + 3 for t in reversed(batch[2]["input_ids"])], "labels": batch[2]["labels"]}
    other = pack(changed, plan_rows([len(x["input_ids"]) for x in changed], 64), tok.pad_token_id)
    with torch.no_grad():
        a = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        b = model(input_ids=other["input_ids"], position_ids=other["position_ids"], use_cache=False).logits[0]
    (order,) = plan_rows([len(x["input_ids"]) for x in batch], 64)  # the examples' order in the one row
    spans, start = {}, 0
    for i in order:
        spans[i] = (start, start + len(batch[i]["input_ids"]))
        start += len(batch[i]["input_ids"])
    for i, (lo, hi) in spans.items():
        if i == 2:
            assert not torch.allclose(a[lo:hi], b[lo:hi])  # the changed example did change
        else:
            torch.testing.assert_close(a[lo:hi], b[lo:hi], rtol=0, atol=1e-6, msg=f"example {i}")


@pytest.mark.parametrize(("attention", "why"), [("flex_attention", "FlexAttention has no backward pass on the CPU"),
                                                ("flash_attention_2", "FlashAttention runs on CUDA only")])
def test_an_attention_that_cannot_train_on_the_cpu_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch, attention: str, why: str) -> None:
    def never(*args: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("epi.trainer.build_model", never)
    with pytest.raises(UserError, match=f"^model.attn_implementation={attention}: {why}; on cpu train with sdpa"):
        Trainer(make_cfg(f"model.attn_implementation={attention}", "device=cpu"), tmp_path)


def test_isolation_stays_bit_exact_on_packed_batches(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*EPI_FAST, "strategy._target_=tests.helpers.WatchedEPI", "data.packing=true"), tmp_path)
    trainer.fit()  # WatchedEPI checks every isolated coordinate after every step
    assert any(int(m.sum()) for _, masks in trainer.strategy.history for m in masks.values())


def test_exclusive_isolation_packs_rows_that_mix_tasks_and_splits_them_by_each_tasks_tokens(tmp_path: Path) -> None:
    """Exclusive isolation packs a micro-batch as any run does, its rows mixing tasks, and splits the backward by
    each task's tokens: every task's tokens are exactly the spans its examples fill (the padding after a row's last
    example in none), the row split ran (no fallback), a coordinate whose owners are absent from a step's batch is
    bit-identical after it (`Watched`), and the model equals the unpacked run's to float tolerance."""
    common = [*EPI_FAST, "strategy.mode=exclusive", "isolation.task_split=rows", "schedule.steps=8"]
    models = {}
    for packing in ("true", "false"):
        (tmp_path / packing).mkdir()
        trainer = Trainer(make_cfg(*common, f"data.packing={packing}"), tmp_path / packing)
        watched = Watched(trainer)
        draw, split = trainer.stepper.draw_step, []

        def recording(learner, step, draw=draw, split=split):
            out = draw(learner, step)
            split.extend(m for m in out[0] if m.split is not None)
            return out

        trainer.stepper.draw_step = recording
        trainer.fit()
        assert watched.checked > 0
        models[packing] = trainer.model.state_dict()
        if packing == "true":
            assert split and all(why is None for why in trainer.stepper.rows_why.values())  # the row split ran on packed batches
            mixed = 0
            for micro in split:
                ids, positions = micro.batch["input_ids"], micro.batch["position_ids"].reshape(-1)
                owner = torch.full((ids.numel(),), -1)
                assert micro.split.order is not None  # the rows are gathered task by task
                for t, tokens in enumerate(micro.split.tokens.values()):
                    at = micro.split.order[tokens]
                    assert bool((owner[at] == -1).all())  # no token is two tasks'
                    owner[at] = t
                assert micro.split.count == ids.numel() and list(micro.split.tokens) == sorted(micro.split.tokens)
                starts = (positions == 0).nonzero().squeeze(1).tolist() + [ids.numel()]
                for lo, hi in zip(starts, starts[1:]):  # an example's span is one task's; only a row's padding is none's
                    span = owner[lo:hi]
                    assert bool((span == span[0]).all()), (lo, hi)
                    if span[0] == -1:
                        assert bool((ids.reshape(-1)[lo:hi] == trainer.stepper.pad_id).all()) and hi % ids.shape[1] == 0
                mixed += sum(len(set(row.tolist()) - {-1}) > 1 for row in owner.reshape(ids.shape))
            assert mixed > 0  # rows that hold two tasks' examples: the packing exclusive isolation keeps
    for name, value in models["false"].items():  # float rounding only (the packed rows sum in another order)
        assert float((models["true"][name] - value).norm() / value.norm()) < 1e-4, name


def test_a_packed_run_logs_the_realised_mixture_and_trains_like_an_unpacked_one(tmp_path: Path) -> None:
    runs = {}
    for packing in ("true", "false"):
        (tmp_path / packing).mkdir()
        trainer = Trainer(make_cfg("strategy=none", "schedule.steps=6", f"data.packing={packing}"), tmp_path / packing)
        losses = []
        for step in range(1, 7):
            trainer.step = step
            losses.append(trainer.train_step(step).loss)
        runs[packing] = (losses, trainer.learner.realised, trainer.stepper.compute)
    assert runs["true"][1] == runs["false"][1] and runs["true"][2] == runs["false"][2]  # examples, tokens, compute: as before
    assert runs["true"][0] == pytest.approx(runs["false"][0], rel=1e-4)


def test_each_step_logs_the_share_of_its_cells_that_is_padding_which_packing_removes(tmp_path: Path) -> None:
    """train/padding = 1 - tokens / (rows x width over the step's micro-batches): zero for one example a row, and
    lower packed than padded on the same examples (the built-in mix pads about 45% at batch 16)."""
    padding = {}
    for name, overrides in {"padded": ["data.packing=false"], "packed": ["data.packing=true"],
                            "one a row": ["data.packing=false", "schedule.batch_size=1"]}.items():
        run_dir = tmp_path / name.replace(" ", "_")
        run_dir.mkdir()
        Trainer(make_cfg("strategy=none", "schedule.steps=3", "schedule.log_every=1", *overrides), run_dir).fit()
        padding[name] = [e["value"] for e in read_metrics(run_dir) if e["split"] == "train" and e["metric"] == "padding"]
    assert len(padding["padded"]) == 3 and padding["one a row"] == [0.0, 0.0, 0.0]
    for padded, packed in zip(padding["padded"], padding["packed"]):
        assert 0 <= packed < padded and padded > 0.2
