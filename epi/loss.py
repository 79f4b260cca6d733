"""The training objective: next-token cross-entropy on trained positions, summed so the caller can
weight it by the global batch's trained-token count (all micro-batches, all ranks).

Only the reply tokens carry loss (prompt, template and padding do not: 18% of the real tokens
of SmolLM2 on the built-in tasks), and the LM head is the model's widest matrix (49152 x 576 of
SmolLM2's 135M parameters). So by default the head runs on the final hidden states of the trained
positions only (`schedule.lm_head=trained`); `all` runs it everywhere, as Hugging Face's `labels=`
loss does (and as this project did before the key existed: its numbers reproduce bit for bit).
The two agree to float rounding (the sums run in a different order); `CausalLMLoss.check`
verifies on the model at hand, before a run starts, that its logits are what the head computes.

`schedule.compile=true` runs the model's forward (the decoder, under `trained`) through
`torch.compile(dynamic=True)`: inductor fuses the elementwise work between the matrix products. Only
the training loss is compiled; evaluation and generation call the model itself, eagerly, and the
isolation engine's step (the optimizer) is never inside a compiled region.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epi.data.format import IGNORE_INDEX
from epi.errors import UserError

LM_HEAD = ("trained", "all")  # schedule.lm_head


def causal_lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy over the trained positions (labels != IGNORE_INDEX), in fp32.

    The caller divides by the global batch's trained-token count (`trained_tokens`); with one
    micro-batch on one process that is exactly the mean Hugging Face's `labels=` loss computes.
    """
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class CausalLMLoss(torch.nn.Module):
    """A causal LM and its summed training loss as one module.

    One module, so that DistributedDataParallel wraps the whole computation (the position
    selection included) and its gradient hooks see every parameter the loss used.
    """

    def __init__(self, model: torch.nn.Module, lm_head: str = "trained", compile: bool = False) -> None:
        super().__init__()
        if lm_head not in LM_HEAD:
            raise ValueError(f"lm_head={lm_head!r} is not one of {list(LM_HEAD)}")
        self.model, self.lm_head = model, lm_head
        # what the loss calls: the whole model (`all`) or its decoder (`trained`), compiled or not. Kept out of the
        # module tree (not an attribute nn.Module registers), so state_dict and DDP see the model's parameters once.
        run = model if lm_head == "all" else model.get_decoder()
        self.__dict__["run"] = torch.compile(run, dynamic=True) if compile else run

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """The summed loss of a padded batch (`attention_mask`) or a packed one (`position_ids` restarting per
        example, no mask: epi.data.format.pack)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:  # transformers reads packed sequences off the positions only without a KV cache
            inputs.update(position_ids=position_ids, use_cache=False)
        if self.lm_head == "all":
            return causal_lm_loss_sum(self.run(**inputs).logits, labels)
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        hidden = self.run(**inputs).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, :-1][trained])
        return torch.nn.functional.cross_entropy(logits.float(), targets[trained], reduction="sum")

    @torch.no_grad()
    def check(self, vocab_size: int, device: torch.device) -> None:
        """Refuse `lm_head=trained` on a model whose logits are not its output embedding of the decoder's
        last hidden state (a final soft-cap or logit scale, as some architectures have): the trained-positions
        loss would silently be another objective there."""
        if self.lm_head == "all":
            return
        was_training = self.model.training
        self.model.eval()
        ids = torch.arange(8, device=device).remainder(vocab_size).unsqueeze(0)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        full = causal_lm_loss_sum(self.model(input_ids=ids, attention_mask=mask).logits, labels)
        mine = self(ids, mask, labels)
        self.model.train(was_training)
        if not torch.allclose(full, mine, rtol=1e-4, atol=1e-4):
            raise UserError(
                f"schedule.lm_head=trained: this model's logits are not its output embedding of the last hidden "
                f"state (loss {float(mine):.6g} vs {float(full):.6g} from its own forward); use schedule.lm_head=all"
            )


def trained_tokens(labels: list[int]) -> int:
    """Positions `causal_lm_loss_sum` counts: labels after the first (nothing predicts the first token)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])
