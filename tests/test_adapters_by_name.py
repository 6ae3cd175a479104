"""Adapters by name: adapters(), set_active, disabled, delete, merge with names and strengths, summary."""
import copy

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import max_rel, perturb

X = torch.randn(3, 8)


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.Linear(8, 4))


def two_adapters(**kwargs):
    """a: LoRA on the first two linears and the head unfrozen; b: SVD on the same layers; outputs of base, a, b."""
    base = mlp().eval()
    model = copy.deepcopy(base)
    vp.attach(model, "lora", targets=["0", "2"], name="a", rank=2, unfreeze=["3"], **kwargs)
    vp.attach(model, "svd", targets=["0", "2"], name="b")
    perturb(model)
    return base, model


def alone(model, name):
    """The output with only ``name`` active, on a copy."""
    copy_ = copy.deepcopy(model)
    vp.set_active(copy_, name)
    return copy_(X)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, vp.adapters(model))


def assert_same(model, snap):
    state, grads, info = snapshot(model)
    assert grads == snap[1] and info == snap[2]
    assert all(torch.equal(state[k], snap[0][k]) for k in state)


def test_adapters_lists_every_adapter_in_attach_order():
    _, model = two_adapters()
    info = vp.adapters(model)
    assert list(info) == ["a", "b"]
    assert info["a"]["method"] == "lora" and info["b"]["method"] == "svd"
    assert info["a"]["active"] and not info["a"]["merged"]
    assert info["a"]["layers"] == ["0", "2"]
    assert info["a"]["parameters"] == 2 * (8 + 16) + 2 * (16 + 8)
    assert info["a"]["options"]["rank"] == 2


def test_set_active_switches_output_and_trainable_parameters():
    base, model = two_adapters()
    both, first_both = model(X), model[0](X)
    vp.set_active(model, "a")
    only_a, first_a = model(X), model[0](X)
    trainable = vp.trainable_parameters(model)
    assert trainable and all(".vp_adapters.a." in f".{n}" or n.startswith("3.") for n in trainable)
    assert any(n.startswith("3.") for n in trainable)  # a's unfrozen head trains with it
    vp.set_active(model, ["b"])
    only_b, first_b = model(X), model[0](X)
    assert all(".vp_adapters.b." in f".{n}" for n in vp.trainable_parameters(model))
    # on one linear layer both adapters' contributions add up
    first = base[0](X)
    assert max_rel(first_both - first, (first_a - first) + (first_b - first)) < 1e-4
    reference = base(X)
    assert not torch.allclose(only_a, only_b)
    vp.set_active(model, [])
    assert torch.allclose(model(X), reference, atol=1e-5)
    assert not vp.trainable_parameters(model)
    vp.set_active(model, ["a", "b"])
    assert torch.allclose(model(X), both, atol=1e-6)


def test_inactive_adapters_are_saved_with_their_state(tmp_path):
    base, model = two_adapters()
    vp.set_active(model, "b")
    y = model(X)
    vp.save(model, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path)
    assert {n: i["active"] for n, i in vp.adapters(loaded).items()} == {"a": False, "b": True}
    assert torch.equal(loaded(X), y)
    assert set(vp.trainable_parameters(loaded)) == set(vp.trainable_parameters(model))
    vp.set_active(loaded, "a")
    assert torch.allclose(loaded(X), alone(model, "a"), atol=1e-6)


def test_unknown_names_are_refused_before_anything_changes():
    _, model = two_adapters()
    snap = snapshot(model)
    for call in (lambda: vp.set_active(model, ["a", "nope"]), lambda: vp.delete(model, "nope"),
                 lambda: vp.merge(model, names=["a", "nope"]), lambda: vp.merge(model, scale={"a": 1, "nope": 1})):
        with pytest.raises(ValueError, match=r"'nope' is not attached; attached: a, b"):
            call()
        assert_same(model, snap)
    with pytest.raises(ValueError, match="names=3"):
        vp.set_active(model, 3)
    with pytest.raises(ValueError, match="strength"):
        vp.merge(model, scale={"a": "x"})
    assert_same(model, snap)


def test_disabled_gives_base_output_merged_included_and_restores_on_error():
    base, model = two_adapters()
    reference = base(X)
    vp.merge(model, names=["a"])
    y = model(X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with vp.disabled(model):
        assert max_rel(model(X), reference) < 1e-5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit for bit
    assert torch.equal(model(X), y)
    with pytest.raises(RuntimeError, match="inside"):
        with vp.disabled(model):
            raise RuntimeError("inside")
    assert torch.equal(model(X), y)
    assert vp.adapters(model)["a"]["merged"]


def test_delete_removes_one_adapter_as_if_never_attached():
    base, model = two_adapters()
    only_b = alone(model, "b")
    vp.merge(model, names=["a"])
    vp.delete(model, "a")
    assert list(vp.adapters(model)) == ["b"]
    assert all(".vp_adapters.a." not in f".{k}" for k in model.state_dict())
    assert torch.allclose(model(X), only_b, atol=1e-5)
    assert not any(n.startswith("3.") for n in vp.trainable_parameters(model))  # a's unfrozen head goes with it
    vp.delete(model, "b")
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert max_rel(model(X), base(X)) < 1e-6


def test_merge_by_name_with_strengths_and_exact_unmerge():
    base, model = two_adapters()
    deltas = {n: model[0].vp_delta(n, "weight") for n in ("a", "b")}
    vp.merge(model, scale={"a": 0.6, "b": 0.4})
    assert max_rel(model[0].weight, base[0].weight + 0.6 * deltas["a"] + 0.4 * deltas["b"]) < 1e-6
    with pytest.raises(ValueError, match="already merged"):
        vp.merge(model, names=["a"])
    vp.unmerge(model)
    assert max_rel(model[0].weight, base[0].weight) < 1e-6
    vp.merge(model, scale=2.0, names="b")
    assert max_rel(model[0].weight, base[0].weight + 2.0 * deltas["b"]) < 1e-6
    assert vp.adapters(model)["b"]["merged"] and not vp.adapters(model)["a"]["merged"]
    vp.unmerge(model)
    vp.set_active(model, "a")
    with pytest.raises(ValueError, match="inactive"):
        vp.merge(model, names=["b"])
    vp.merge(model)  # default: the active adapters only
    assert set(model[0]._vp_merged) == {"a"}
    vp.unmerge(model)
    vp.set_active(model, ["a", "b"])
    with pytest.raises(ValueError, match=r"no strength for adapter\(s\) \['b'\]"):
        vp.merge(model, scale={"a": 1.0}, names=["a", "b"])


def test_set_active_unmerges_an_adapter_it_deactivates():
    base, model = two_adapters()
    only_b = alone(model, "b")
    vp.merge(model)
    vp.set_active(model, "b")
    assert set(model[0]._vp_merged) == {"b"}
    assert torch.allclose(model(X), only_b, atol=1e-5)


def test_detach_merges_only_the_active_adapters():
    _, model = two_adapters()
    only_a = alone(model, "a")
    vp.set_active(model, "a")
    vp.detach(model, merge=True)
    assert torch.allclose(model(X), only_a, atol=1e-5)


def test_summary_shows_method_active_and_merged_per_adapter():
    _, model = two_adapters()
    vp.set_active(model, "a")
    vp.merge(model)
    lines = vp.summary(model).splitlines()
    assert lines[0].split()[:4] == ["adapter", "method", "active", "merged"]
    assert lines[2].split()[:4] == ["a", "lora", "yes", "yes"]
    assert lines[3].split()[:4] == ["b", "svd", "no", "no"]


def test_regularization_counts_only_active_adapters():
    model = nn.Sequential(nn.Linear(96, 96), nn.Linear(96, 8))  # large enough for SaRA's rank penalty
    vp.attach(model, "sara", targets=["0"], name="a", density=0.2)
    vp.attach(model, "lora", targets=["1"], name="b")
    perturb(model)
    assert vp.regularization(model).item() != 0.0
    vp.set_active(model, "b")
    assert vp.regularization(model).item() == 0.0


def test_save_chosen_adapters_with_their_active_states(tmp_path):
    base, model = two_adapters()
    vp.set_active(model, "b")
    vp.save(model, tmp_path, names=["b"])
    loaded = vp.load(copy.deepcopy(base), tmp_path)
    assert list(vp.adapters(loaded)) == ["b"]
    assert torch.allclose(loaded(X), alone(model, "b"), atol=1e-6)
    assert not any(n.startswith("3.") for n in loaded.state_dict() if ".vp_adapters." not in n
                   and loaded.get_parameter(n).requires_grad)  # a's unfrozen head is not b's
    vp.save(model, tmp_path / "a", names="a")
    inactive = vp.load(copy.deepcopy(base), tmp_path / "a")
    assert vp.adapters(inactive)["a"]["active"] is False
    assert torch.equal(inactive[3].weight, model[3].weight)
    with pytest.raises(ValueError, match="'c' is not attached"):
        vp.save(model, tmp_path / "c", names=["c"])
    assert not (tmp_path / "c").exists()


def test_load_under_another_name(tmp_path):
    base, model = two_adapters()
    vp.save(model, tmp_path / "a", names=["a"])
    vp.load(model, tmp_path / "a", name="a_again")
    assert list(vp.adapters(model)) == ["a", "b", "a_again"]
    first = model[0]
    assert torch.equal(first.vp_adapters["a_again"]["weight"].lora_B, first.vp_adapters["a"]["weight"].lora_B)
    vp.set_active(model, "a_again")
    assert torch.allclose(model(X), alone(model, "a"), atol=1e-6)
    vp.save(model, tmp_path / "both", names=["a", "b"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match="renames a single-adapter directory"):
        vp.load(model, tmp_path / "both", name="c")
    assert_same(model, snap)


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    base, model = two_adapters()
    vp.save(model, tmp_path)
    target = copy.deepcopy(base)
    vp.attach(target, "lora", targets=["2"], name="b")  # the second adapter's name is taken
    snap = snapshot(target)
    with pytest.raises(ValueError, match="'b' is already attached"):
        vp.load(target, tmp_path)
    assert_same(target, snap)
    assert list(vp.adapters(target)) == ["b"]
