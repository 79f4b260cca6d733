"""SLERP, linear interpolation and CPI-FT's fuse step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epi.merge import fuse, lerp, slerp


def _reference_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Textbook SLERP in float64, written independently of epi.merge."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    omega = np.arccos(np.clip(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1.0, 1.0))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


# --- slerp / lerp ------------------------------------------------------------


def test_slerp_endpoints() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    out0, path0 = slerp(a, b, 0.0)
    out1, path1 = slerp(a, b, 1.0)
    assert path0 == path1 == "slerp"
    assert out0.dtype == a.dtype and out0.shape == a.shape
    torch.testing.assert_close(out0, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out1, b, rtol=1e-6, atol=1e-6)


def test_slerp_symmetry() -> None:
    torch.manual_seed(1)
    a, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    for t in (0.1, 0.3, 0.5, 0.9):
        torch.testing.assert_close(slerp(a, b, t)[0], slerp(b, a, 1 - t)[0], rtol=1e-12, atol=1e-12)


def test_slerp_preserves_equal_norm() -> None:
    torch.manual_seed(2)
    a, b = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    b = b * (a.norm() / b.norm())
    for t in (0.0, 0.2, 0.5, 0.77, 1.0):
        out, path = slerp(a, b, t)
        assert path == "slerp"
        assert out.norm().item() == pytest.approx(a.norm().item(), rel=1e-12)
    # lerp shrinks the same midpoint: the property is SLERP's, not an accident of the data
    assert lerp(a, b, 0.5).norm() < 0.9 * a.norm()


def test_slerp_matches_numpy_reference() -> None:
    torch.manual_seed(3)
    for _ in range(5):
        a, b = torch.randn(3, 11), 3.0 * torch.randn(3, 11)  # unequal norms: raw vectors are interpolated
        for t in (0.0, 0.25, 0.6, 1.0):
            out, path = slerp(a, b, t)
            assert path == "slerp"
            expected = _reference_slerp(a.numpy(), b.numpy(), t).reshape(3, 11)
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.0, -1.0, -0.5], ids=["b=a", "b=2a", "b=-a", "b=-a/2"])
def test_slerp_colinear_and_antiparallel_fall_back_to_linear(scale: float) -> None:
    torch.manual_seed(4)
    a = torch.randn(4, 4)
    b = scale * a
    for t in (0.0, 0.3, 1.0):
        out, path = slerp(a, b, t)
        assert path == "linear"
        assert torch.equal(out, lerp(a, b, t))
    assert torch.isfinite(slerp(a, b, 0.5)[0]).all()


def test_slerp_threshold_is_one_minus_abs_cos_below_eps() -> None:
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    angle = 1e-3  # 1 - cos ≈ 5e-7
    b = torch.tensor([np.cos(angle), np.sin(angle)], dtype=torch.float64)
    assert slerp(a, b, 0.5, eps=1e-6)[1] == "linear"
    assert slerp(a, b, 0.5, eps=1e-7)[1] == "slerp"
    assert slerp(a, -b, 0.5, eps=1e-6)[1] == "linear"
    with pytest.raises(ValueError, match="eps"):
        slerp(a, b, 0.5, eps=0.0)


def test_slerp_zero_vector() -> None:
    torch.manual_seed(5)
    a = torch.randn(10)
    zero = torch.zeros(10)
    for x, y in ((a, zero), (zero, a), (zero, zero)):
        out, path = slerp(x, y, 0.4)
        assert path == "zero"
        assert torch.equal(out, lerp(x, y, 0.4))


def test_lerp_exact_endpoints_and_dtype() -> None:
    torch.manual_seed(6)
    a, b = torch.randn(8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    assert torch.equal(lerp(a, b, 0.0), a) and torch.equal(lerp(a, b, 1.0), b)
    assert lerp(a, b, 0.5).dtype == torch.bfloat16


# --- fuse ------------------------------------------------------------------------


def _model(seed: int, scale: float = 1.0, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A small state dict; with `base`, that base plus a `scale`-sized random delta."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 5), "b": (6,)}
    out = {n: scale * torch.randn(s, generator=g) + (base[n] if base else 0.0) for n, s in shapes.items()}
    out["steps"] = torch.tensor([3, 1], dtype=torch.int64) if base is None else base["steps"].clone()
    return out


def test_fuse_transplant_overlap_winner() -> None:
    base = {"p": torch.zeros(6)}
    tasks = {
        "A": {"p": torch.tensor([1.0, 5.0, -3.0, 2.0, 10.0, 20.0])},
        "B": {"p": torch.tensor([4.0, -1.0, 3.0, -7.0, 30.0, 40.0])},
    }
    cores = {
        "A": {"p": torch.tensor([True, True, True, True, False, False])},
        "B": {"p": torch.tensor([True, True, True, False, True, False])},
    }
    fused, _ = fuse(base, tasks, cores, omega=1.0, eps=1e-8)
    p = fused["p"]
    assert p[0] == 4.0  # both cores, |ΔB| = 4 > |ΔA| = 1: B
    assert p[1] == 5.0  # both cores, |ΔA| = 5 > |ΔB| = 1: A
    assert p[2] == -3.0  # both cores, tie |ΔA| = |ΔB| = 3: first task, A
    assert p[3] == 2.0  # A's core only; B's larger |Δ| = 7 does not count outside its core
    assert p[4] == 30.0  # B's core only
    # p[5] is in no core: the SLERP blend, which is neither task's value
    assert p[5] not in (20.0, 40.0)
    # tasks in the other order: the tie goes to B
    fused_ba, _ = fuse(base, {"B": tasks["B"], "A": tasks["A"]}, cores, omega=1.0, eps=1e-8)
    assert fused_ba["p"][2] == 3.0


@pytest.mark.parametrize("space", ["task_vector", "weight"])
def test_fuse_single_task_endpoints(space: str) -> None:
    base = _model(0)
    theta1 = _model(1, scale=0.5, base=base)
    core = {"w": torch.rand(6, 5, generator=torch.Generator().manual_seed(9)) < 0.3}
    at_one, log = fuse(base, {"A": theta1}, {"A": core}, omega=1.0, eps=1e-8, space=space)
    at_zero, _ = fuse(base, {"A": theta1}, {"A": core}, omega=0.0, eps=1e-8, space=space)
    for name in ("w", "b"):
        assert torch.equal(at_one[name], theta1[name])
        expected = torch.where(core[name], theta1[name], base[name]) if name in core else base[name]
        assert torch.equal(at_zero[name], expected)  # base off the core, θ1 transplanted on it
    assert torch.equal(at_one["steps"], base["steps"])
    folds_plus_final = {"task_vector": 0, "weight": 1}[space]
    assert all(sum(counts.values()) == folds_plus_final for counts in log.values())
    assert set(log) == {"w", "b"}  # the int buffer is copied, not merged


def test_fuse_matches_composition_of_slerps() -> None:
    base = _model(0)
    tasks = {f"T{i}": _model(i + 1, scale=0.3, base=base) for i in range(3)}
    omega, eps = 0.7, 1e-8
    fused, log = fuse(base, tasks, {}, omega=omega, eps=eps)
    for name in ("w", "b"):
        deltas = [tasks[t][name].double() - base[name].double() for t in tasks]
        m, _ = slerp(deltas[0], deltas[1], 1 / 2, eps)
        m, _ = slerp(m, deltas[2], 1 / 3, eps)
        torch.testing.assert_close(fused[name], (base[name].double() + omega * m).float())
        assert log[name] == {"slerp": 2, "linear": 0, "zero": 0}

    fused_w, log_w = fuse(base, tasks, {}, omega=omega, eps=eps, space="weight")
    for name in ("w", "b"):
        thetas = [tasks[t][name].double() for t in tasks]
        m, _ = slerp(thetas[0], thetas[1], 1 / 2, eps)
        m, _ = slerp(m, thetas[2], 1 / 3, eps)
        expected, _ = slerp(base[name].double(), m, omega, eps)
        torch.testing.assert_close(fused_w[name], expected.float())
        assert sum(log_w[name].values()) == 3


def test_fuse_logs_zero_path_for_identical_task() -> None:
    base = _model(0)
    tasks = {"A": _model(1, scale=0.1, base=base), "same": {n: v.clone() for n, v in base.items()}}
    _, log = fuse(base, tasks, {}, omega=0.5, eps=1e-8)
    assert log["w"] == {"slerp": 0, "linear": 0, "zero": 1}  # task "same" has a zero task vector


def test_fuse_weight_space_is_colinear_task_vectors_are_not() -> None:
    """Two small fine-tunes of one base: whole-tensor cosine ≈ 1 in weight space, ≈ 0 between task vectors."""
    base = _model(0)
    tasks = {"A": _model(1, scale=1e-5, base=base), "B": _model(2, scale=1e-5, base=base)}
    _, log_w = fuse(base, tasks, {}, omega=0.5, eps=1e-8, space="weight")
    _, log_tv = fuse(base, tasks, {}, omega=0.5, eps=1e-8, space="task_vector")
    for name in ("w", "b"):
        assert log_w[name] == {"slerp": 0, "linear": 2, "zero": 0}  # fold + base → merged
        assert log_tv[name] == {"slerp": 1, "linear": 0, "zero": 0}


def test_fuse_does_not_mutate_inputs() -> None:
    base = _model(0)
    tasks = {"A": _model(1, scale=0.2, base=base), "B": _model(2, scale=0.2, base=base)}
    cores = {"A": {"w": torch.ones(6, 5, dtype=torch.bool)}, "B": {"b": torch.ones(6, dtype=torch.bool)}}
    snapshot = [{n: v.clone() for n, v in sd.items()} for sd in (base, *tasks.values(), *cores.values())]
    for space in ("task_vector", "weight"):
        fused, _ = fuse(base, tasks, cores, omega=0.6, eps=1e-8, space=space)
        for name, value in fused.items():
            for sd in (base, *tasks.values()):
                assert value.data_ptr() != sd[name].data_ptr()
    for before, after in zip(snapshot, (base, *tasks.values(), *cores.values())):
        assert before.keys() == after.keys()
        assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"space": "weights"}, "space"),
        ({"omega": -0.1}, "omega"),
        ({"omega": 1.5}, "omega"),
        ({"omega": float("nan")}, "omega"),
    ],
)
def test_fuse_rejects_bad_arguments(kwargs: dict, key: str) -> None:
    base = _model(0)
    args = {"omega": 0.5, "eps": 1e-8, **kwargs}
    with pytest.raises(ValueError, match=key):
        fuse(base, {"A": _model(1, 0.1, base)}, {}, **args)


def test_fuse_rejects_mismatched_inputs() -> None:
    base = _model(0)
    task = _model(1, 0.1, base)
    with pytest.raises(ValueError, match="tasks"):
        fuse(base, {}, {}, omega=0.5, eps=1e-8)
    with pytest.raises(ValueError, match="'b'"):
        fuse(base, {"A": {n: v for n, v in task.items() if n != "b"}}, {}, omega=0.5, eps=1e-8)
    with pytest.raises(ValueError, match="'C'"):
        fuse(base, {"A": task}, {"C": {}}, omega=0.5, eps=1e-8)
    with pytest.raises(ValueError, match="bool mask"):
        fuse(base, {"A": task}, {"A": {"w": torch.ones(6, 5)}}, omega=0.5, eps=1e-8)
