"""The training objective: next-token cross-entropy on trained positions, summed so the caller can
weight it by the global batch's trained-token count (all micro-batches, all ranks)."""

from __future__ import annotations

import torch
from torch import Tensor

from epi.data.format import IGNORE_INDEX


def causal_lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy over the trained positions (labels != IGNORE_INDEX), in fp32.

    The caller divides by the global batch's trained-token count (`trained_tokens`); with one
    micro-batch on one process that is exactly the mean Hugging Face's `labels=` loss computes.
    """
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def trained_tokens(labels: list[int]) -> int:
    """Positions `causal_lm_loss_sum` counts: labels after the first (nothing predicts the first token)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])
