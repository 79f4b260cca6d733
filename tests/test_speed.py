"""Issue 15, speed changes that must not change what is computed.

The LM head at trained positions only (`schedule.lm_head=trained`) gives the full-logits loss and
gradients to float rounding, and `all` is Hugging Face's `labels=` loss; length-grouped
batching (`schedule.group_by_length`) trains the stream's examples, never lets a pool cross a change
of the mixture, and resumes inside a pool exactly; AdamW is the fused kernel by default.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from epi.data.format import IGNORE_INDEX, collate
from epi.data.mixture import MixtureSampler
from epi.errors import UserError
from epi.loss import CausalLMLoss
from epi.trainer import Trainer
from tests.conftest import crash_and_resume, make_cfg
from tests.test_trust import recorded


def small_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of different lengths, each with a prompt (no loss) and a reply (loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (9, 17, 5, 13):
        ids = torch.randint(0, 97, (n,), generator=g).tolist()
        prompt = n // 2
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return collate(rows, pad_id=0)


def loss_and_grads(model: torch.nn.Module, lm_head: str, batch: dict[str, torch.Tensor], bf16: bool = False,
                   loss_fn: CausalLMLoss | None = None):
    model.zero_grad()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        loss = (loss_fn or CausalLMLoss(model, lm_head))(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trained_positions_give_the_full_logits_loss_and_gradients(tied: bool) -> None:
    model, batch = small_llama(tied), padded_batch()
    full, full_grads = loss_and_grads(model, "all", batch)
    mine, my_grads = loss_and_grads(model, "trained", batch)
    torch.testing.assert_close(mine, full, rtol=1e-6, atol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(my_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_trained_positions_under_bf16_autocast_track_the_full_logits_loss() -> None:
    model, batch = small_llama(True), padded_batch(1)
    full, _ = loss_and_grads(model, "all", batch, bf16=True)
    mine, _ = loss_and_grads(model, "trained", batch, bf16=True)
    torch.testing.assert_close(mine, full, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor's CPU backend needs a C++ compiler")
def test_a_compiled_forward_gives_the_eager_loss_and_gradients_and_leaves_the_model_eager() -> None:
    """`schedule.compile=true`: the loss module's forward runs compiled, over the model's own parameters
    (no second copy in its state_dict), for batches of other lengths too (dynamic shapes); the model
    itself, which evaluation and generation call, is not compiled."""
    model = small_llama(False)
    keys = list(CausalLMLoss(model, "trained").state_dict())
    compiled = CausalLMLoss(model, "trained", compile=True)
    assert list(compiled.state_dict()) == keys and type(model.get_decoder()).__name__ == "LlamaModel"
    for seed in (0, 1):  # two batches of different shapes: one compilation serves both
        batch = padded_batch(seed)
        batch = {k: v[:, : 10 + 4 * seed] for k, v in batch.items()}
        eager, eager_grads = loss_and_grads(model, "trained", batch)
        mine, my_grads = loss_and_grads(model, "trained", batch, loss_fn=compiled)
        torch.testing.assert_close(mine, eager, rtol=1e-5, atol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(my_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert compiled.run is not model.get_decoder()  # it did run through torch.compile


def test_all_positions_is_hugging_faces_labels_loss() -> None:
    """HF divides its summed loss by `num_items_in_batch` when given it, as the trainer divides by the global count
    (its sum runs over one more, ignored, position per row: equal to float rounding, not bit for bit)."""
    model, batch = small_llama(False), padded_batch(2)
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], num_items_in_batch=trained).loss
    ours = CausalLMLoss(model, "all")(batch["input_ids"], batch["attention_mask"], batch["labels"]) / trained
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)


class ScaledLogits(LlamaForCausalLM):
    """An architecture whose logits are not the output embedding of the last hidden state (like a soft-cap)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_trained_positions_are_refused_where_the_logits_are_transformed() -> None:
    torch.manual_seed(0)
    model = ScaledLogits(small_llama(False).config)
    with pytest.raises(UserError, match="schedule.lm_head=all"):
        CausalLMLoss(model, "trained").check(97, torch.device("cpu"))
    CausalLMLoss(model, "all").check(97, torch.device("cpu"))  # the full-logits loss is right for any model
    CausalLMLoss(small_llama(True), "trained").check(97, torch.device("cpu"))


def test_the_run_trains_the_same_with_either_head(tmp_path: Path) -> None:
    trained = recorded(tmp_path, "schedule.lm_head=trained")
    full = recorded(tmp_path, "schedule.lm_head=all")
    for step, (a, b) in enumerate(zip(trained.strategy.grads, full.strategy.grads), start=1):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=f"step {step} {name}")


def test_adamw_is_fused_by_default(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg("strategy=none", "schedule.steps=1"), tmp_path)
    assert trainer.optimizer.optimizer.defaults["fused"] is True


# --- length grouping -------------------------------------------------------------------------

LENGTHS = {"a": [3 + (i * 7) % 40 for i in range(50)], "b": [10 + (i * 13) % 90 for i in range(30)]}


def cells(sampler: MixtureSampler, batches: list[list[tuple[str, int]]]) -> int:
    return sum(len(b) * max(sampler.lengths[t][i] for t, i in b) for b in batches)


def test_length_grouping_trains_the_streams_examples_with_less_padding() -> None:
    plain = MixtureSampler({"a": 50, "b": 30}, {"a": 1.0, "b": 2.0}, seed=3, lengths=LENGTHS)
    grouped = MixtureSampler({"a": 50, "b": 30}, {"a": 1.0, "b": 2.0}, seed=3, lengths=LENGTHS)
    stream = [plain.next_batch(4) for _ in range(8)]
    pooled = [grouped.next_batch(4, group=8) for _ in range(8)]
    assert Counter(p for b in pooled for p in b) == Counter(p for b in stream for p in b)  # same examples, same mixture
    assert cells(grouped, pooled) < 0.8 * cells(plain, stream)
    assert grouped.state_dict()["drawn"] == plain.state_dict()["drawn"] and not grouped.pending


def test_a_sampler_restored_inside_a_pool_continues_it() -> None:
    a = MixtureSampler({"a": 50, "b": 30}, {"a": 1.0, "b": 1.0}, seed=5, lengths=LENGTHS)
    first = [a.next_batch(4, group=6) for _ in range(3)]
    b = MixtureSampler({"a": 50, "b": 30}, {"a": 1.0, "b": 1.0}, seed=5, lengths=LENGTHS)
    b.load_state_dict(a.state_dict())
    assert [a.next_batch(4, group=6) for _ in range(5)] == [b.next_batch(4, group=6) for _ in range(5)]
    assert first  # the pool was drawn before the state was taken


def test_a_length_grouped_pool_ends_with_its_stage(tmp_path: Path) -> None:
    """Stages of 3 steps with pools of 5: the pool of stage A must be cut at 3 batches, so no example of
    A is drawn and thrown away, and stage B trains B alone."""
    stages = "schedule.stages=[{name: a, tasks: [math], steps: 3}, {name: b, tasks: [code], steps: 3}]"
    trainer = Trainer(make_cfg("strategy=none", stages, "schedule.group_by_length=5"), tmp_path)
    trainer.fit()
    assert trainer.sampler.drawn["math"] == 3 * 4 and trainer.sampler.drawn["code"] == 3 * 4
    assert trainer.learner.realised["math"]["examples"] == 12 and trainer.learner.realised["code"]["examples"] == 12


def test_resume_inside_a_length_grouped_pool_gives_the_same_weights(tmp_path: Path) -> None:
    common = ["strategy=none", "schedule.steps=6", "schedule.group_by_length=4", "schedule.checkpoint_every=3"]
    straight, resumed, state = crash_and_resume(tmp_path, common, 4)
    assert state["step"] == 3 and len(state["sampler"]["pending"]) == 1  # steps 1-4 are one pool
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_group_by_length_must_be_a_count() -> None:
    from epi.config import validate
    from epi.data.load import known_tasks

    with pytest.raises(UserError, match="schedule.group_by_length"):
        validate(make_cfg("schedule.group_by_length=-1"), known_tasks(make_cfg().data))


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_is_named_at_setup(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch, has_bf16: bool) -> None:
    """On an AVX2-only CPU bf16 autocast is emulated (108 s a SmolLM2 step against 4.6 s in fp32): the run says so."""
    from epi import distributed

    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: has_bf16)
    Trainer(make_cfg("strategy=none", "schedule.steps=1", "schedule.precision=bf16"), tmp_path)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: schedule.precision=bf16")]
    assert len(warned) == (0 if has_bf16 else 1)
    (tmp_path / "fp32").mkdir()
    Trainer(make_cfg("strategy=none", "schedule.steps=1"), tmp_path / "fp32")  # fp32 never warns
    assert "schedule.precision=bf16" not in capsys.readouterr().err
