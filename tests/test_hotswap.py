"""Hot-swap: vp.load(..., name=, hotswap=True) copies in place; a compiled model is not recompiled."""
import copy

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import perturb

X = torch.randn(3, 8)


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def saved(tmp_path, method="lora", **options):
    model = vp.attach(mlp(), method, targets=["0", "2"], **options)
    perturb(model, std=0.3)
    vp.save(model, tmp_path)
    return model


def test_hotswap_into_a_compiled_model_does_not_recompile(tmp_path):
    from torch._dynamo.testing import CompileCounter

    smaller = saved(tmp_path / "r2", rank=2, alpha=5)  # smaller rank and another scale: zero-padded, folded into B
    model = vp.attach(mlp(), "lora", targets=["0", "2"], rank=4)
    perturb(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(X)
        graphs = counter.frame_count
        assert graphs >= 1
        vp.load(model, tmp_path / "r2", name="default", hotswap=True)
        out = compiled(X)
    assert counter.frame_count == graphs
    assert torch.allclose(out, smaller(X), atol=1e-5)
    assert model[0].vp_adapters["default"]["weight"].lora_A.shape == (4, 8)


def test_hotswap_of_another_method_copies_its_tensors(tmp_path):
    source = saved(tmp_path, "svd")
    model = vp.attach(mlp(), "svd", targets=["0", "2"])
    vp.load(model, tmp_path, name="default", hotswap=True)
    assert torch.allclose(model(X), source(X), atol=1e-6)


def test_bad_hotswaps_are_refused_and_change_nothing(tmp_path):
    saved(tmp_path / "r8", rank=8)
    saved(tmp_path / "svd", "svd")
    other_layers = vp.attach(mlp(), "lora", targets=["0"], rank=2)
    vp.save(perturb(other_layers), tmp_path / "one")
    model = vp.attach(mlp(), "lora", targets=["0", "2"], rank=4)
    before = copy.deepcopy(model.state_dict())
    for directory, kwargs, needle in [
        ("r8", dict(name="default"), "rank 8 in the file, larger than the attached rank 4"),
        ("svd", dict(name="default"), "'svd' adapter"),
        ("one", dict(name="default"), "other layers"),
        ("r8", dict(name="nope"), "no attached adapter named 'nope'"),
    ]:
        with pytest.raises(ValueError, match=needle):
            vp.load(model, tmp_path / directory, hotswap=True, **kwargs)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
