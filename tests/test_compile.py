"""torch.compile: for every registered method a tiny timm ViT's forward compiles into one graph (no graph break), and
a compiled training step gives eager's loss and gradients. (Hot-swapping into a compiled model without recompiling:
tests/test_hotswap.py.)

The no-break and gradient checks use the "aot_eager" backend (dynamo plus AOT autograd, the graphs inductor would
get, without its code generation); one LoRA check runs inductor itself.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import visionpeft as vp
from conftest import perturb
from visionpeft.methods.base import _ALIASES

#: small settings for the tiny model; any method missing here runs with its defaults
OPTIONS = {
    "lora": dict(rank=2), "flora": dict(rank=2), "dora": dict(rank=2), "map": dict(rank=2), "mora": dict(rank=2),
    "alpha-lora": dict(rank=2), "nola": dict(rank=2, num_basis=(8, 8)),
    "snella": dict(rank=2, density=0.5, init_density=0.5), "snell": dict(rank=2, density=0.5),
    "sara": dict(density=0.05),
}
#: other forward paths of the methods whose defaults skip them
VARIANTS = [("snella", dict(path="activation")), ("sara", dict(path="weight"))]
CASES = [(name, OPTIONS.get(name, {})) for name in vp.methods() if name not in _ALIASES] + \
    [(name, dict(OPTIONS[name], **extra)) for name, extra in VARIANTS]


def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                             depth=1, num_heads=2, num_classes=4)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)


def adapted(method, options):
    model = vp.attach(tiny_vit(), method, unfreeze=["head"], **options)
    return perturb(model, std=0.05)  # every adapter has an effect, so its gradient path is exercised


def loss_and_grads(model, trained, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trained.items()}
    for p in trained.values():
        p.grad = None
    return loss.detach(), grads


def _label(case):
    name, options = case
    extra = {k: v for k, v in options.items() if k not in OPTIONS.get(name, {})}
    return name + "".join(f"-{k}={v}" for k, v in extra.items())


@pytest.mark.parametrize("case", CASES, ids=_label)
def test_forward_compiles_without_graph_breaks_and_trains_as_eager(case):
    method, options = case
    torch._dynamo.reset()
    model = adapted(method, options)
    x, y = batch()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(reason) for reason in explanation.break_reasons]
    trained = vp.trainable_parameters(model)
    eager_loss, eager_grads = loss_and_grads(model, trained, x, y)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, backend="aot_eager"), trained, x, y)
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6), (compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-6), \
            (name, (compiled_grads[name] - grad).abs().max())


def test_snella_budget_change_does_not_recompile():
    """The compiled graph reads SNELLA's budget from its buffer: a re-allocation changes a tensor, not the code."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = adapted("snella", OPTIONS["snella"])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x, _ = batch()
    with torch.no_grad():
        compiled(x)
        graphs = counter.frame_count
        layer = next(m for m in model.modules() if hasattr(m, "set_budget"))
        layer.set_budget(layer.numel // 4)
        changed = compiled(x)
    assert counter.frame_count == graphs
    with torch.no_grad():
        assert torch.allclose(changed, model(x), rtol=1e-5, atol=1e-6)


def test_lora_under_inductor_trains_as_eager():
    torch._dynamo.reset()
    model = adapted("lora", OPTIONS["lora"])
    x, y = batch()
    trained = vp.trainable_parameters(model)
    eager_loss, eager_grads = loss_and_grads(model, trained, x, y)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model), trained, x, y)
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-5), name
