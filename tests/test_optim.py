"""The masked optimizer step: frozen coordinates must not move, bit for bit."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from epi.masks import churn
from epi.optim import IsolatedOptimizer, clip_coefficient
from epi.trainer import Trainer
from tests.helpers import make_cfg

LR = 1e-2
WD = 0.1
IMPLS = {"foreach": {"foreach": True}, "forloop": {"foreach": False}, "fused": {"fused": True}}
POLICIES = ("track", "reset")


def make_model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))


def make_iso(model: nn.Module, moments: str = "track", impl: str = "foreach") -> IsolatedOptimizer:
    inner = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, **IMPLS[impl])
    return IsolatedOptimizer(inner, dict(model.named_parameters()), moments=moments)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def train(model: nn.Module, iso: IsolatedOptimizer, steps: range, max_norm: float | None = 0.5) -> None:
    for step in steps:
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        iso.hide_isolated_grads()
        coef = 1.0
        if max_norm is not None:
            coef = clip_coefficient(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), max_norm)
        iso.step(coef)
        iso.zero_grad()


def random_masks(model: nn.Module, frac: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < frac for n, p in model.named_parameters()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def momentum(iso: IsolatedOptimizer, name: str, key: str = "exp_avg") -> torch.Tensor:
    return iso.optimizer.state[iso.named_params[name]][key]


def at_masks(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The masked elements of all tensors, concatenated (small tensors may have none)."""
    return torch.cat([tensors[n][m] for n, m in masks.items()])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("moments", POLICIES)
def test_isolated_coords_bit_identical(moments: str, impl: str) -> None:
    model = make_model()
    iso = make_iso(model, moments, impl)
    train(model, iso, range(5))
    masks = random_masks(model, 0.3, seed=1)
    exp_avg = {n: momentum(iso, n) for n in masks}
    assert (at_masks(exp_avg, masks) != 0).float().mean() > 0.9  # momentum has built up where we freeze
    iso.set_masks(masks)
    before = snapshot(model)
    train(model, iso, range(5, 55))
    for name, p in model.named_parameters():
        assert torch.equal(p[masks[name]], before[name][masks[name]]), name
        assert (p != before[name])[~masks[name]].all(), name


def test_naive_grad_masking_moves_frozen_coords() -> None:
    """Why the wrapper exists: zeroed grads alone do not freeze under AdamW."""
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    iso = IsolatedOptimizer(inner, dict(model.named_parameters()))
    train(model, iso, range(5))
    masks = random_masks(model, 0.3, seed=1)
    before = snapshot(model)
    for step in range(5, 10):
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        for name, p in model.named_parameters():
            p.grad[masks[name]] = 0
        inner.step()
        inner.zero_grad()
    assert all((p != before[n])[masks[n]].all() for n, p in model.named_parameters())


@pytest.mark.parametrize("impl", ["foreach", "forloop"])
@pytest.mark.parametrize("moments", POLICIES)
def test_refresh(moments: str, impl: str) -> None:
    model = make_model()
    iso = make_iso(model, moments, impl)
    train(model, iso, range(5))
    old = random_masks(model, 0.3, seed=1)
    iso.set_masks(old)
    at_old = snapshot(model)
    train(model, iso, range(5, 25))
    keep, fresh = random_masks(model, 0.5, seed=2), random_masks(model, 0.15, seed=3)
    new = {n: (old[n] & keep[n]) | fresh[n] for n in old}
    assert iso.set_masks(new) == churn(old, new)
    at_new = snapshot(model)
    train(model, iso, range(25, 45))
    assert all(sum(int(m.sum()) for m in ms.values()) > 50 for ms in (old, new))
    for name, p in model.named_parameters():
        still = old[name] & new[name]
        newly = new[name] & ~old[name]
        released = old[name] & ~new[name]
        assert torch.equal(p[still], at_old[name][still]), name
        assert torch.equal(p[newly], at_new[name][newly]), name
        assert (p != at_new[name])[released].all(), name


@pytest.mark.parametrize("impl", ["foreach", "forloop"])
def test_reset_release_step_is_bounded(impl: str) -> None:
    """Long enough that Adam's per-tensor bias correction has saturated (1 - 0.999^3000 = 0.95):
    only then would a zeroed exp_avg_sq give the ~3.2·lr kick this test guards against.
    Gradients are drawn directly (biased, so momentum builds up) to keep 3000 steps cheap."""
    w = nn.Parameter(torch.randn(512, generator=torch.Generator().manual_seed(0)))
    iso = IsolatedOptimizer(torch.optim.AdamW([w], lr=LR, weight_decay=WD, **IMPLS[impl]), {"w": w}, "reset")
    g = torch.Generator().manual_seed(1)

    def steps(n: int) -> None:
        for _ in range(n):
            w.grad = 1 + 0.5 * torch.randn(512, generator=g)
            iso.step()
            iso.zero_grad()

    steps(3000)
    mask = torch.rand(512, generator=g) < 0.3
    iso.set_masks({"w": mask})
    steps(10)
    assert iso.set_masks({}) == {"protected": 0, "released": int(mask.sum()), "kept": 0}
    state = iso.optimizer.state[w]
    assert not state["exp_avg"][mask].any()  # stale first moment dropped
    assert state["exp_avg_sq"][mask].all()  # second moment kept
    before = w.detach().clone()
    steps(1)
    delta = (w - before).abs()[mask]
    assert delta.max() <= 1.5 * LR
    assert (delta > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_track_moments_follow_true_grads(impl: str) -> None:
    """A loss linear in W makes grads independent of W, so an unmasked run sees the same grads."""
    w_free, w_iso = (nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0))) for _ in range(2))
    free = torch.optim.AdamW([w_free], lr=LR, weight_decay=WD, **IMPLS[impl])
    iso = IsolatedOptimizer(torch.optim.AdamW([w_iso], lr=LR, weight_decay=WD, **IMPLS[impl]), {"w": w_iso})
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) < 0.3
    iso.set_masks({"w": mask})
    held = w_iso.detach().clone()
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        c = torch.randn(6, 5, generator=g)
        (w_free * c).sum().backward()
        (w_iso * c).sum().backward()
        free.step()
        free.zero_grad()
        iso.hide_isolated_grads()
        iso.step(1.0)
        iso.zero_grad()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(iso.optimizer.state[w_iso][key], free.state[w_free][key]), key
    assert torch.equal(w_iso[mask], held[mask])
    assert torch.equal(w_iso[~mask], w_free[~mask])


@pytest.mark.parametrize("moments", POLICIES)
def test_clip_norm_ignores_isolated_grads(moments: str) -> None:
    model = make_model()
    iso = make_iso(model, moments)
    masks = random_masks(model, 0.3, seed=1)
    iso.set_masks(masks)
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=g)
        p.grad[masks[name]] = 1e6
    expected = torch.cat([p.grad[~masks[n]] for n, p in model.named_parameters()]).norm()
    iso.hide_isolated_grads()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    assert torch.allclose(total, expected, rtol=1e-6)
    coef = clip_coefficient(total, 0.1)
    assert coef < 1
    iso.step(coef)
    for name, p in model.named_parameters():
        want = torch.full_like(p.grad, 1e6) * coef if moments == "track" else torch.zeros_like(p.grad)
        assert torch.allclose(p.grad[masks[name]], want[masks[name]], rtol=1e-6), name


@pytest.mark.parametrize("moments", POLICIES)
def test_state_dict_round_trip_is_bit_exact(moments: str) -> None:
    refresh = random_masks(make_model(), 0.2, seed=5)
    model_a = make_model()
    iso_a = make_iso(model_a, moments)
    train(model_a, iso_a, range(3))
    iso_a.set_masks(random_masks(model_a, 0.3, seed=4))
    train(model_a, iso_a, range(3, 10))
    saved_model = {k: v.clone() for k, v in model_a.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(iso_a.state_dict(), buffer)
    train(model_a, iso_a, range(10, 15))
    iso_a.set_masks(refresh)
    train(model_a, iso_a, range(15, 20))

    model_b = make_model(seed=99)
    model_b.load_state_dict(saved_model)
    iso_b = make_iso(model_b, moments)
    buffer.seek(0)
    iso_b.load_state_dict(torch.load(buffer, weights_only=True))
    train(model_b, iso_b, range(10, 15))
    iso_b.set_masks(refresh)
    train(model_b, iso_b, range(15, 20))

    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(momentum(iso_a, name, "exp_avg_sq"), momentum(iso_b, name, "exp_avg_sq")), name
    assert iso_a.masks.keys() == iso_b.masks.keys()
    assert all(torch.equal(iso_a.masks[n], iso_b.masks[n]) for n in iso_a.masks)


def test_lr_scheduler_drives_inner_optimizer() -> None:
    model = make_model()
    iso = make_iso(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(iso.optimizer, lambda step: 0.5**step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        train(model, iso, range(1))
        scheduler.step()
    assert iso.param_groups[0]["lr"] == pytest.approx(LR / 2)


@pytest.mark.parametrize("moments", POLICIES)
def test_sgd_momentum(moments: str) -> None:
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    iso = IsolatedOptimizer(inner, dict(model.named_parameters()), moments=moments)
    train(model, iso, range(3))
    masks = random_masks(model, 0.3, seed=1)
    iso.set_masks(masks)
    before = snapshot(model)
    train(model, iso, range(3, 13))
    assert all(torch.equal(p[masks[n]], before[n][masks[n]]) for n, p in model.named_parameters())
    iso.set_masks({})
    buffers = at_masks({n: momentum(iso, n, "momentum_buffer") for n in masks}, masks)
    assert (not buffers.any()) == (moments == "reset")


def test_set_masks_stores_only_isolating_entries() -> None:
    model = make_model()
    iso = make_iso(model)
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    masks["0.weight"][0, 0] = True
    assert iso.set_masks(masks) == {"protected": 1, "released": 0, "kept": 0}
    assert list(iso.masks) == ["0.weight"]


def test_validation() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="track"):
        make_iso(model, "freeze")
    iso = make_iso(model)
    with pytest.raises(ValueError, match="nope"):
        iso.set_masks({"nope": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        iso.set_masks({"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="moments"):
        make_iso(make_model(), "reset").load_state_dict(iso.state_dict())


def test_adamw_is_fused_by_default(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg("strategy=none", "schedule.steps=1"), tmp_path)
    assert trainer.optimizer.optimizer.defaults["fused"] is True
