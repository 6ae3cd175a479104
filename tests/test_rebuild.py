"""Weight-path effective weights rebuilt in backward (layers.kinds.rebuilt_on_backward): same gradients,
no W + ΔW kept between forward and backward, and out of the way of non-reentrant checkpointing."""
import importlib

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import visionpeft as vp
from conftest import Wrap, perturb
from visionpeft.layers import kinds

CASES = {
    "linear": (lambda: nn.Linear(16, 12), lambda: torch.randn(4, 5, 16)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1, dilation=1), lambda: torch.randn(2, 6, 7, 7)),
    # q, k, v blocks of in_proj_weight: the fused weight is rebuilt from its three blocks
    "mha": (lambda: nn.MultiheadAttention(16, 2, batch_first=True), lambda: torch.randn(2, 5, 16)),
}
METHODS = {"snella": dict(rank=4, density=0.5, path="weight"), "sara": dict(density=0.2, path="weight")}


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x, x, x)[0] if isinstance(model.layer, nn.MultiheadAttention) else model(x)
    (out.square().sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_rebuilt_weight_gives_the_same_gradients_and_is_not_kept(method, case, monkeypatch):
    make_layer, make_input = CASES[case]
    model = Wrap(make_layer())
    vp.attach(model, method, targets=["layer"], **METHODS[method])
    perturb(model)
    x = make_input()
    rebuilds = _count_rebuilds(monkeypatch, method)
    out, grad_x, grads = _run(model, x)
    assert rebuilds, "the op kept W + ΔW instead of rebuilding it"
    expected_rebuilds = 3 if case == "mha" else 1  # in_proj's three blocks; out_proj is a plain linear
    assert len(rebuilds) >= expected_rebuilds

    monkeypatch.setattr(kinds, "_other_saved_tensor_hooks", lambda: True)  # the op keeps W + ΔW
    rebuilds.clear()
    kept_out, kept_grad_x, kept_grads = _run(model, x)
    assert not rebuilds
    assert torch.equal(out, kept_out) and torch.equal(grad_x, kept_grad_x)
    assert grads.keys() == kept_grads.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], kept_grads[name]), name


def _count_rebuilds(monkeypatch, method: str) -> list:
    rebuilds = []
    original = kinds.rebuildable

    def counting(effective, weight, rebuild):
        def counted(base):
            rebuilds.append(tuple(base.shape))
            return rebuild(base)
        return original(effective, weight, counted)

    monkeypatch.setattr(importlib.import_module(f"visionpeft.methods.{method}"), "rebuildable", counting)
    return rebuilds


def test_under_checkpointing_the_checkpoint_decides(monkeypatch):
    model = Wrap(nn.Linear(16, 12))
    vp.attach(model, "snella", targets=["layer"], **METHODS["snella"])
    perturb(model)
    x = torch.randn(3, 16)
    rebuilds = _count_rebuilds(monkeypatch, "snella")
    _, grad_x, grads = _run(model, x)
    assert rebuilds
    # with checkpoint's hooks on, ours stand aside (hooks do not nest: passing the op's other saved
    # tensors through ours would keep what checkpointing means to drop)
    rebuilds.clear()
    model.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    checkpoint(model, leaf, use_reentrant=False).square().sum().backward()
    assert not rebuilds
    assert torch.equal(leaf.grad, grad_x)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name
