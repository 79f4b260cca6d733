"""The LM head at trained positions only (`schedule.lm_head=trained`, the default) gives the full-logits loss and
gradients to float rounding, `all` is Hugging Face's `labels=` loss, and a compiled forward (`schedule.compile`) gives
the eager loss and gradients: speed settings that must not change what is computed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from epi.data.format import IGNORE_INDEX, collate
from epi.errors import UserError
from epi.loss import CausalLMLoss
from tests.helpers import recorded


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


@pytest.mark.slow
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
