"""vp.combine: each `how` against its formula on explicit factors."""
import copy
import math

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import perturb
from visionpeft.combine import task_arithmetic

X = torch.randn(4, 8)


def lora_pair(ranks=(2, 2), alphas=(2, 6)):
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Conv1d(12, 6, 1))
    model.forward = lambda x: model[2](model[1](model[0](x)).unsqueeze(-1)).squeeze(-1)
    for name, rank, alpha in zip("ab", ranks, alphas):
        vp.attach(model, "lora", targets=["0", "2"], name=name, rank=rank, alpha=alpha)
    return perturb(model, std=0.3)


def factors(model, name, layer="0"):
    return model.get_submodule(layer).vp_adapters[name]["weight"].factors()


def delta(model, name, layer="0"):
    return model.get_submodule(layer).vp_delta(name, "weight")


def new_delta(model, layer="0"):
    return delta(model, "new", layer)


WEIGHTS = {"a": 0.7, "b": -0.4}


def test_cat_is_exact_with_the_sum_of_ranks():
    model = lora_pair(ranks=(2, 3))
    vp.combine(model, WEIGHTS, name="new", how="cat")
    for layer in ("0", "2"):
        expected = 0.7 * delta(model, "a", layer) + -0.4 * delta(model, "b", layer)
        assert torch.allclose(new_delta(model, layer), expected, atol=1e-6)
    assert vp.adapters(model)["new"]["options"]["rank"] == 5
    assert vp.adapters(model)["new"]["active"] is False
    vp.set_active(model, "new")
    combined = model(X)
    vp.set_active(model, ["a", "b"])
    vp.merge(model, scale={"a": 0.7, "b": -0.4})
    assert torch.allclose(combined, model(X), atol=1e-5)


def test_linear_combines_a_and_b_as_peft_does():
    model = lora_pair()
    vp.combine(model, WEIGHTS, name="new", how="linear")
    (a1, b1, s1), (a2, b2, s2) = factors(model, "a"), factors(model, "b")
    c1, c2 = math.sqrt(0.7 * s1), math.sqrt(0.4 * s2)
    expected = (c1 * b1 - c2 * b2) @ (c1 * a1 + c2 * a2)
    assert torch.allclose(new_delta(model), expected, atol=1e-6)


def test_svd_of_mixed_methods_is_exact_at_full_rank_and_truncated_below():
    model = nn.Sequential(nn.Linear(8, 6))
    vp.attach(model, "lora", targets=["0"], name="a", rank=2)
    vp.attach(model, "svd", targets=["0"], name="b")
    perturb(model, std=0.3)
    expected = 0.7 * delta(model, "a") - 0.4 * delta(model, "b")
    vp.combine(model, WEIGHTS, name="new", how="svd", rank=6)
    assert torch.allclose(new_delta(model), expected, atol=1e-5)
    vp.combine(model, WEIGHTS, name="low", how="svd", rank=2)
    u, s, vh = torch.linalg.svd(expected.double())
    assert torch.allclose(delta(model, "low").double(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)


def test_ties_and_dare_follow_their_formulas_and_dare_is_seeded():
    model = lora_pair()
    (a1, b1, s1), (a2, b2, s2) = factors(model, "a"), factors(model, "b")
    c = [math.sqrt(0.7 * s1), math.sqrt(0.4 * s2)]
    density = 0.5

    def ties(tensors, weights):
        pruned = []
        for t in tensors:
            keep = int(density * t.numel())
            threshold = t.abs().flatten().sort(descending=True).values[keep - 1]
            pruned.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
        weighted = torch.stack([w * t for w, t in zip(weights, pruned)])
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = weighted.sign() == majority
        return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)

    vp.combine(model, WEIGHTS, name="new", how="ties", density=density)
    expected = ties([b1, b2], [c[0], -c[1]]) @ ties([a1, a2], c)
    assert torch.allclose(new_delta(model), expected, atol=1e-6)

    tensors = [torch.randn(5, 7), torch.randn(5, 7)]
    g = torch.Generator().manual_seed(3)
    dropped = task_arithmetic(tensors, [0.5, 2.0], "dare_linear", density=0.25, generator=g)
    g = torch.Generator().manual_seed(3)
    masks = [torch.bernoulli(torch.full((5, 7), 0.25), generator=g) for _ in tensors]
    assert torch.allclose(dropped, sum(w * t * m / 0.25 for w, t, m in zip([0.5, 2.0], tensors, masks)))

    vp.combine(model, WEIGHTS, name="d1", how="dare_ties", density=0.5, seed=7)
    vp.combine(model, WEIGHTS, name="d2", how="dare_ties", density=0.5, seed=7)
    vp.combine(model, WEIGHTS, name="d3", how="dare_ties", density=0.5, seed=8)
    assert torch.equal(delta(model, "d1"), delta(model, "d2"))
    assert not torch.equal(delta(model, "d1"), delta(model, "d3"))


def test_bad_input_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(8, 6))
    vp.attach(model, "lora", targets=["0"], name="a", rank=2)
    vp.attach(model, "svd", targets=["0"], name="b")
    vp.attach(model, "lora", targets=["0"], name="c", rank=3)
    before = copy.deepcopy(vp.adapters(model))
    cases = [
        (dict(weights={"a": 1, "zz": 1}, how="cat"), "'zz' is not attached; attached: a, b, c"),
        (dict(weights={"a": 1, "b": 1}, how="cat"), "use how='svd'"),
        (dict(weights={"a": 1, "c": 1}, how="linear"), "one rank"),
        (dict(weights={"a": 1}, how="mean"), "how='mean' is unknown"),
        (dict(weights={"a": 1}, how="svd"), "needs rank="),
        (dict(weights={"a": 1}, how="ties", density=0), "density=0"),
        (dict(weights={"a": 1}, how="cat", density=0.5), "do not apply"),
        (dict(weights={"a": 1}, how="cat", name="b"), "'b' is already attached"),
    ]
    for kwargs, needle in cases:
        kwargs.setdefault("name", "new")
        with pytest.raises(ValueError) as err:
            vp.combine(model, **kwargs)
        assert needle in str(err.value)
        assert vp.adapters(model) == before
