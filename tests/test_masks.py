"""Mask construction, comparison and storage."""

from __future__ import annotations

import pytest
import torch

from epi.masks import (
    churn,
    churn_indices,
    jaccard,
    layer_of,
    mask_stats,
    normalize,
    pack,
    param_kind,
    participating,
    sampled_fraction_bound,
    top_p,
    union,
    unpack,
)


def _count(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def _assert_top(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], k: int) -> None:
    """Exactly k selected and nothing unselected scores above anything selected."""
    assert _count(masks) == k
    picked = torch.cat([scores[n][masks[n]] for n in scores])
    left = torch.cat([scores[n][~masks[n]] for n in scores])
    if left.numel():
        assert picked.min() >= left.max()


# --- classification -----------------------------------------------------------

LLAMA = {
    "model.embed_tokens.weight": torch.zeros(10, 4),
    "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
    "model.layers.0.self_attn.q_proj.bias": torch.zeros(4),
    "model.layers.0.input_layernorm.weight": torch.zeros(4),
    "model.layers.1.mlp.down_proj.weight": torch.zeros(4, 8),
    "model.norm.weight": torch.zeros(4),
    "lm_head.weight": torch.zeros(10, 4),
}


def test_param_kind() -> None:
    kinds = {n: param_kind(n, p) for n, p in LLAMA.items()}
    assert kinds == {
        "model.embed_tokens.weight": "embedding",
        "model.layers.0.self_attn.q_proj.weight": "weight",
        "model.layers.0.self_attn.q_proj.bias": "bias",
        "model.layers.0.input_layernorm.weight": "norm",
        "model.layers.1.mlp.down_proj.weight": "weight",
        "model.norm.weight": "norm",
        "lm_head.weight": "embedding",
    }
    assert param_kind("model.layers.0.scale", torch.zeros(4)) == "norm"  # unnamed 1-D scale vector


@pytest.mark.parametrize(
    ("include", "extra"),
    [
        ({}, set()),
        ({"embeddings": True}, {"model.embed_tokens.weight", "lm_head.weight"}),
        ({"norms": True}, {"model.layers.0.input_layernorm.weight", "model.norm.weight"}),
        ({"biases": True, "norms": False}, {"model.layers.0.self_attn.q_proj.bias"}),
    ],
)
def test_participating(include: dict[str, bool], extra: set[str]) -> None:
    weights = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert set(participating(LLAMA, include)) == weights | extra


def test_participating_unknown_key() -> None:
    with pytest.raises(ValueError, match="embedding"):
        participating(LLAMA, {"embedding": True})


def test_layer_of() -> None:
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of("model.layers.12.input_layernorm.weight") == "model.layers.12"
    assert layer_of("base_model.model.model.layers.0.self_attn.q_proj.weight") == "base_model.model.model.layers.0"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert layer_of("lm_head.weight") == "lm_head.weight"


# --- normalize -----------------------------------------------------------------

def test_normalize_per_layer_group() -> None:
    scores = {
        "model.layers.0.a.weight": torch.tensor([1.0, 3.0]),
        "model.layers.0.b.weight": torch.tensor([[2.0, 6.0]]),
        "model.layers.1.a.weight": torch.tensor([10.0, 30.0]),
        "lm_head.weight": torch.zeros(2),
    }
    mean = normalize(scores, "mean")  # layer 0 mean = 3, layer 1 mean = 20
    assert torch.allclose(mean["model.layers.0.a.weight"], torch.tensor([1 / 3, 1.0]))
    assert torch.allclose(mean["model.layers.0.b.weight"], torch.tensor([[2 / 3, 2.0]]))
    assert torch.allclose(mean["model.layers.1.a.weight"], torch.tensor([0.5, 1.5]))
    assert torch.equal(mean["lm_head.weight"], torch.zeros(2))  # zero group: guarded, stays zero
    mx = normalize(scores, "max")
    assert torch.allclose(mx["model.layers.0.a.weight"], torch.tensor([1 / 6, 0.5]))
    assert torch.allclose(mx["model.layers.1.a.weight"], torch.tensor([1 / 3, 1.0]))
    assert all(torch.equal(normalize(scores, "none")[n], s) for n, s in scores.items())
    with pytest.raises(ValueError, match="normalize"):
        normalize(scores, "sum")


# --- top_p ------------------------------------------------------------------------

HAND = {
    "model.layers.0.a.weight": torch.tensor([[9.0, 1.0], [5.0, 3.0]]),
    "model.layers.0.b.weight": torch.tensor([8.0, 0.0, 2.0, 7.0]),
    "model.layers.1.a.weight": torch.tensor([4.0, 6.0, 10.0, 11.0]),
}


def test_top_p_exact_global() -> None:
    masks = top_p(HAND, 0.25)  # k = round(0.25 * 12) = 3 → 11, 10, 9
    assert torch.equal(masks["model.layers.0.a.weight"], torch.tensor([[True, False], [False, False]]))
    assert not masks["model.layers.0.b.weight"].any()
    assert torch.equal(masks["model.layers.1.a.weight"], torch.tensor([False, False, True, True]))


def test_top_p_exact_layer() -> None:
    masks = top_p(HAND, 0.25, scope="layer")  # layer 0: k=2 of 8 → 9, 8; layer 1: k=1 of 4 → 11
    assert torch.equal(masks["model.layers.0.a.weight"], torch.tensor([[True, False], [False, False]]))
    assert torch.equal(masks["model.layers.0.b.weight"], torch.tensor([True, False, False, False]))
    assert torch.equal(masks["model.layers.1.a.weight"], torch.tensor([False, False, False, True]))


def test_top_p_exact_tensor() -> None:
    masks = top_p(HAND, 0.5, scope="tensor")  # k=2 per tensor
    assert torch.equal(masks["model.layers.0.a.weight"], torch.tensor([[True, False], [True, False]]))
    assert torch.equal(masks["model.layers.0.b.weight"], torch.tensor([True, False, False, True]))
    assert torch.equal(masks["model.layers.1.a.weight"], torch.tensor([False, False, True, True]))


def test_top_p_exact_ties_and_minimum() -> None:
    flat = {"a": torch.ones(10), "b": torch.ones(3, 3)}
    masks = top_p(flat, 0.3)  # k = round(5.7) = 6 among 19 equal scores
    assert _count(masks) == 6
    assert torch.equal(masks["a"], torch.tensor([True] * 6 + [False] * 4))  # ties broken in order
    assert _count(top_p(flat, 1e-9)) == 1  # at least one element
    assert _count(top_p(flat, 1.0)) == 19


def test_top_p_exact_float64_precision() -> None:
    """Scores that only float64 tells apart must still give exactly k."""
    scores = {"a": 1 + torch.arange(1000, dtype=torch.float64) * 1e-12, "b": torch.ones(10, dtype=torch.float64)}
    masks = top_p(scores, 0.1)  # k = round(101) = 101: a[899:], all distinct only in float64
    _assert_top(scores, masks, 101)
    assert masks["a"][-101:].all() and not masks["a"][:-101].any() and not masks["b"].any()


@pytest.mark.parametrize("scope", ["global", "layer", "tensor"])
@pytest.mark.parametrize("p", [0.003, 0.1, 0.6])
def test_top_p_exact_large(scope: str, p: float) -> None:
    """Big enough that the threshold is found through the sampled bracket."""
    g = torch.Generator().manual_seed(0)
    scores = {
        "model.layers.0.a.weight": torch.rand(600, 1000, generator=g),
        "model.layers.0.b.weight": torch.rand(400, 1000, generator=g) * 2,
        "model.layers.1.a.weight": torch.rand(700_000, generator=g) ** 4,
    }
    masks = top_p(scores, p, scope=scope)
    groups = {"global": [list(scores)], "layer": [list(scores)[:2], list(scores)[2:]], "tensor": [[n] for n in scores]}
    for names in groups[scope]:
        sub = {n: scores[n] for n in names}
        _assert_top(sub, {n: masks[n] for n in names}, round(p * sum(s.numel() for s in sub.values())))


def test_top_p_exact_heavy_ties_large() -> None:
    """Most scores are exactly zero and the threshold falls inside the zeros."""
    g = torch.Generator().manual_seed(1)
    s = torch.rand(1_000_000, generator=g)
    s[s < 0.9] = 0.0
    masks = top_p({"x": s}, 0.3)
    _assert_top({"x": s}, masks, 300_000)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_top_p_sampled_within_bound(p: float) -> None:
    g = torch.Generator().manual_seed(2)
    scores = {"a": torch.randn(1000, 1000, generator=g).abs(), "b": torch.rand(1_000_000, generator=g) ** 3}
    n = 200_000
    bound = sampled_fraction_bound(n)
    masks = top_p(scores, p, method="sampled", sample_size=n, generator=torch.Generator().manual_seed(3))
    realised = _count(masks) / 2_000_000
    assert abs(realised - p) <= bound
    picked = torch.cat([scores[k][masks[k]] for k in scores])
    left = torch.cat([scores[k][~masks[k]] for k in scores])
    assert picked.min() > left.max()  # a threshold, not an arbitrary subset


def test_sampled_fraction_bound_values() -> None:
    assert sampled_fraction_bound(1_000_000) == pytest.approx(0.002693, abs=1e-6)
    assert sampled_fraction_bound(4_000_000) < sampled_fraction_bound(1_000_000) / 1.9
    with pytest.raises(ValueError):
        sampled_fraction_bound(0)


def test_top_p_sampled_is_deterministic_with_generator() -> None:
    scores = {"a": torch.rand(2_000_000, generator=torch.Generator().manual_seed(4))}
    one = top_p(scores, 0.05, method="sampled", generator=torch.Generator().manual_seed(5))
    two = top_p(scores, 0.05, method="sampled", generator=torch.Generator().manual_seed(5))
    assert torch.equal(one["a"], two["a"])


def test_top_p_small_group_sampled_is_exact() -> None:
    masks = top_p(HAND, 0.25, method="sampled")
    assert _count(masks) == 3


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"p": 0.0}, "p"), ({"p": 1.5}, "p"), ({"p": 0.1, "scope": "row"}, "scope"), ({"p": 0.1, "method": "fast"}, "method")],
)
def test_top_p_validation(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        top_p(HAND, **kwargs)


# --- comparisons ----------------------------------------------------------------

def test_jaccard_and_churn() -> None:
    a = {"x": torch.tensor([True, True, False, False]), "y": torch.tensor([True, False])}
    b = {"x": torch.tensor([True, False, True, False]), "z": torch.tensor([True])}
    # A = {x0, x1, y0}, B = {x0, x2, z0}: |A∩B| = 1, |A∪B| = 5
    assert jaccard(a, b) == pytest.approx(1 / 5)
    assert jaccard(a, a) == 1.0
    assert jaccard({}, {"x": torch.zeros(3, dtype=torch.bool)}) == 1.0
    assert jaccard(a, {}) == 0.0
    assert churn(a, b) == {"protected": 2, "released": 2, "kept": 1}
    assert churn({}, a) == {"protected": 3, "released": 0, "kept": 0}


def test_churn_of_indices_equals_churn_of_the_masks() -> None:
    g = torch.Generator().manual_seed(0)
    old = {"x": torch.rand(500, generator=g) < 0.1, "y": torch.rand(40, generator=g) < 0.5}
    new = {"x": torch.rand(500, generator=g) < 0.1, "z": torch.rand(30, generator=g) < 0.5}
    flat = lambda masks: {n: m.nonzero().squeeze(1) for n, m in masks.items()}  # noqa: E731
    for a, b in ((old, new), (new, old), ({}, new), (old, old)):
        assert churn_indices(flat(a), flat(b)) == churn(a, b)


def test_mask_stats() -> None:
    masks = {"model.layers.0.a.weight": torch.tensor([True, False, False, False]), "lm_head.weight": torch.ones(2, dtype=torch.bool)}
    numels = {"model.layers.0.a.weight": 4, "model.layers.0.b.weight": 4, "lm_head.weight": 2, "model.norm.weight": 10}
    stats = mask_stats(masks, numels)
    assert stats["isolated_fraction"] == pytest.approx(3 / 20)
    assert stats["frac/model.layers.0"] == pytest.approx(1 / 8)
    assert stats["frac/lm_head.weight"] == 1.0
    assert stats["frac/model.norm.weight"] == 0.0
    assert mask_stats(masks)["isolated_fraction"] == pytest.approx(3 / 6)


def test_union() -> None:
    a = {"x": torch.tensor([True, False, False])}
    b = {"x": torch.tensor([False, False, True]), "y": torch.tensor([True])}
    u = union(a, b)
    assert torch.equal(u["x"], torch.tensor([True, False, True]))
    assert torch.equal(u["y"], torch.tensor([True]))
    assert torch.equal(a["x"], torch.tensor([True, False, False]))  # inputs untouched


def test_pack_unpack_round_trip() -> None:
    g = torch.Generator().manual_seed(6)
    shapes = [(7,), (3, 5, 7), (1,), (), (0, 4), (13, 1), (64,)]
    masks = {f"m{i}": torch.rand(s, generator=g) < 0.3 for i, s in enumerate(shapes)}
    packed = pack(masks)
    assert packed["m1"]["bits"].dtype == torch.uint8 and packed["m1"]["bits"].numel() == (105 + 7) // 8
    back = unpack(packed)
    assert set(back) == set(masks)
    for name, m in masks.items():
        assert back[name].dtype == torch.bool and back[name].shape == m.shape
        assert torch.equal(back[name], m)


def test_top_p_exact_when_bracket_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample that brackets the wrong place only costs speed, never exactness."""
    import epi.masks

    monkeypatch.setattr(epi.masks, "_sample", lambda flats, n, generator, *shards: torch.zeros(n))
    scores = {"x": torch.rand(1_000_000, generator=torch.Generator().manual_seed(7)) + 1}
    _assert_top(scores, top_p(scores, 0.02), 20_000)
