"""Activation memory of one micro-batch's forward and backward, found by running that step on fake tensors.

A plan cannot allocate a 7B model to see what its step holds, and a formula per architecture would drift from the
code it describes (Hugging Face's attention paths and masks, autocast's casts, the LM head on trained positions,
gradient checkpointing's recompute). So the step runs as the stepper runs it (`CausalLMLoss`, under the run's
autocast, then backward) on FakeTensors: tensors with shapes, dtypes and a device but no memory
(`torch._subclasses.FakeTensorMode`, what torch.compile traces with). `LiveBytes` sees every op's outputs and every
storage freed, and keeps the most bytes alive at once; the same counter on real tensors is how the tests measure a
real step (tests/test_plan.py), so estimate and measurement count alike: tensor storages, not allocator slack.

The shape traced is the worst a micro-batch can take: every row as long as the longest (`data.max_len`, or with the
data read the longest training example) and padded (the attention mask is materialised), and the LM head run on
every position (or, with the data read, on every row's most trained tokens; in a real batch only the replies carry
loss). A shorter or packed batch holds less: an upper bound then. The kernels are the CPU's (its SDPA keeps q, k, v,
the output and the log-sum-exp, as flash and memory-efficient attention do on a GPU); nothing here was measured on a
GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from epi.loss import CausalLMLoss

ALL = -1  # LiveBytes(trained=ALL): every position of a fake batch carries loss


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that the ops run inside it create and that are still alive, and keeps
    the peak, leaving out the parameters' gradients (`params`): a plan counts those apart, whole.

    A storage is counted once however many views share it, from the op that creates it until it is freed (a weak
    reference says when); an op's output that views or overwrites one of its inputs is no new memory, so storages
    that existed before (parameters, the batch) are never counted. The live set is swept only when the count might
    pass the peak, so a long trace stays cheap.

    `trained`: on fake tensors, which have no values to count them from, how many positions a boolean index (the LM
    head's trained positions) selects: a number, or every position (`ALL`); None on real tensors.
    """

    def __init__(self, params: list[torch.nn.Parameter] | None = None, trained: int | None = None):
        super().__init__()
        self.params = list(params or [])
        self.trained = trained
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = 0  # bytes of the storages in `live`, some of which may have been freed since the last sweep
        self.peak = 0  # the most bytes alive at once, gradients left out
        self._grads = 0  # gradient bytes at the last sweep: they only grow within a step

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = self._call(func, args, kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        fresh = {}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                if storage._cdata in inputs:
                    continue  # a view of, or written into, an input: no new memory
                known = self.live.get(storage._cdata)
                if known is None or known[0].expired():  # new, or a freed storage's address reused
                    fresh[storage._cdata] = storage
        for key, storage in fresh.items():
            if key in self.live:
                self.now -= self.live.pop(key)[1]
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.now += storage.nbytes()
        if fresh and self.now - self._grads > self.peak:
            self._sweep()
        return out

    def _sweep(self) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        grads = {p.grad.untyped_storage()._cdata for p in self.params if p.grad is not None}
        self._grads = sum(self.live[key][1] for key in grads if key in self.live)
        self.peak = max(self.peak, self.now - self._grads)

    def _selected(self, mask: Tensor) -> Tensor:
        """What nonzero() of a fake boolean mask gives when it holds `trained` True values."""
        count = mask.numel() if self.trained == ALL else min(self.trained, mask.numel())
        return torch.empty((count, mask.dim()), dtype=torch.long, device=mask.device)

    def _call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.trained is not None:
            if func is torch.ops.aten.nonzero.default:
                return self._selected(args[0])
            if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
                indices: list[Tensor | None] = []
                for index in args[1]:
                    if index is not None and index.dtype == torch.bool:
                        indices += self._selected(index).unbind(1)
                    else:
                        indices.append(index)
                return func(args[0], indices, **kwargs)
        return func(*args, **kwargs)


def fake_batch(rows: int, length: int, packing: bool) -> dict[str, Tensor]:
    """A micro-batch of the plan's shape as the collator or packer gives it: `rows` rows of `length` tokens, every
    label trained; padded batches carry an attention mask, packed ones position ids instead."""
    ids = torch.zeros((rows, length), dtype=torch.long)
    batch = {"input_ids": ids, "labels": torch.zeros_like(ids)}
    if packing:
        batch["position_ids"] = torch.zeros_like(ids)
    else:
        batch["attention_mask"] = torch.ones_like(ids)
    return batch


def step_peak(model: torch.nn.Module, batch: dict[str, Tensor], lm_head: str, bf16_autocast: bool,
              trained: int | None = None) -> int:
    """The most bytes alive at once during one forward and backward of `batch` through `CausalLMLoss`, the
    parameters' gradients left out (`LiveBytes`): on fake tensors an estimate, on real ones a measurement."""
    model.train()  # as the stepper steps it: gradient checkpointing (and dropout) act in training mode only
    loss = CausalLMLoss(model, lm_head)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16_autocast else nullcontext()
    with LiveBytes(list(model.parameters()), trained) as live:
        with autocast:
            out = loss(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"))
        out.backward()
    return live.peak


def activation_bytes(model: torch.nn.Module, rows: int, length: int, lm_head: str, bf16_autocast: bool,
                     packing: bool = False, trained: int | None = None) -> int:
    """The activation estimate of a micro-batch of `rows` rows of `length` tokens of which `trained` positions carry
    loss (None: every one), for a model built inside a FakeTensorMode (`epi.models.build_architecture`): its step
    run on fake tensors (module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensor

    param = next(model.parameters())
    if not isinstance(param, FakeTensor):
        raise TypeError("activation_bytes traces a model built inside a FakeTensorMode; a real model's step is measured with step_peak")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the run's own warnings (use_cache under checkpointing) are the run's to print
    try:
        with param.fake_mode:
            return step_peak(model, fake_batch(rows, length, packing), lm_head, bf16_autocast, ALL if trained is None else trained)
    finally:
        hf_logging.set_verbosity(verbosity)
