"""What the fused low-rank branch keeps for backward (``visionpeft.methods.saved_input``): after an activation whose
backward node keeps its input, the branch saves that input and rebuilds its own in backward. The gradients are
bit for bit those of the branch that saves its input itself, and the activation's output is no longer kept."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from conftest import perturb

saved_input = importlib.import_module("visionpeft.methods.saved_input")

ACTIVATIONS = {
    "gelu": nn.GELU(), "gelu-tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
    "mish": nn.Mish(), "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "leaky-relu": nn.LeakyReLU(0.2),
    "elu": nn.ELU(0.7), "selu": nn.SELU(), "celu": nn.CELU(1.3), "softplus": nn.Softplus(2.0, 5.0),
    "hardtanh": nn.Hardtanh(-0.5, 0.8), "relu6": nn.ReLU6(),
}
#: nothing to rebuild: nodes that keep their result, i.e. the branch input itself; an in-place activation on the
#: previous layer's output (a view, whose node is an in-place rebase)
NOTHING_TO_REBUILD = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "silu-inplace": nn.SiLU(inplace=True)}


def saved_storages(output: torch.Tensor) -> dict[int, int]:
    """data pointer → bytes of every storage the autograd graph behind ``output`` has saved (read from its nodes,
    without saved-tensor hooks, which the branch would see and stand aside for)."""
    storages, stack, visited = {}, [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        tensors = list(getattr(node, "saved_tensors", ()))
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                tensors.extend(value if isinstance(value, (tuple, list)) else [value])
        for tensor in tensors:
            if torch.is_tensor(tensor):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return storages


def run(model, inputs, monkeypatch, rebuild: bool, capture: nn.Module | None = None):
    """Loss, gradients of every trainable parameter and of the input, the saved storages, and the output of
    ``capture`` (the activation), with the rebuild on or off (off: the branch saves its input, as before)."""
    with monkeypatch.context() as patch:
        if not rebuild:
            patch.setattr(saved_input, "_REBUILDS", {})
        seen = []
        handle = capture.register_forward_hook(lambda m, a, o: seen.append(o)) if capture is not None else None
        x = inputs.clone().requires_grad_(True)
        out = model(x)
        if handle is not None:
            handle.remove()
        storages = saved_storages(out)
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).square().sum()
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    grads["input"] = x.grad.clone()
    for p in model.parameters():
        p.grad = None
    return loss.detach(), grads, storages, (seen[0] if seen else None)


def check_rebuilt(model, inputs, activation, monkeypatch):
    """Bitwise equal loss and gradients both ways; the activation's output is saved only without the rebuild."""
    loss, grads, storages, act_out = run(model, inputs, monkeypatch, True, activation)
    ref_loss, ref_grads, ref_storages, ref_act_out = run(model, inputs, monkeypatch, False, activation)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    assert ref_act_out.untyped_storage().data_ptr() in ref_storages  # the plain branch keeps x
    assert act_out.untyped_storage().data_ptr() not in storages
    assert sum(ref_storages.values()) - sum(storages.values()) == act_out.untyped_storage().nbytes()


def mlp(activation, hidden=96):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, hidden), activation, nn.Linear(hidden, 12))
    return perturb(vp.attach(model, "lora", targets=["0", "2"], rank=3))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_linear_after_an_activation_rebuilds_its_input_exactly(name, monkeypatch):
    activation = ACTIVATIONS[name]
    # 2 × 384 rows × 96: more than one grain of the intra-op loops, so a rebuild split differently would show
    check_rebuilt(mlp(activation), torch.randn(2, 384, 24) * 2, activation, monkeypatch)


@pytest.mark.parametrize("name", list(NOTHING_TO_REBUILD))
def test_where_nothing_is_rebuilt_nothing_changes(name, monkeypatch):
    activation = NOTHING_TO_REBUILD[name]
    model, inputs = mlp(activation), torch.randn(4, 24)
    _, grads, storages, act_out = run(model, inputs, monkeypatch, True, activation)
    _, ref_grads, ref_storages, _ = run(model, inputs, monkeypatch, False, activation)
    assert storages.keys() != set() and sum(storages.values()) == sum(ref_storages.values())
    assert act_out.untyped_storage().data_ptr() in storages  # the branch keeps x itself
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_timm_mlp_fc2(monkeypatch):
    from timm.layers import Mlp

    torch.manual_seed(0)
    block = Mlp(32, hidden_features=128)
    model = perturb(vp.attach(block, "lora", targets=["fc1", "fc2"], rank=4))
    check_rebuilt(model, torch.randn(2, 50, 32), block.act, monkeypatch)


@pytest.mark.parametrize("activation_fn", ["gelu", "gelu-approximate", "geglu"])
def test_diffusers_feed_forward(activation_fn, monkeypatch):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    block = FeedForward(32, activation_fn=activation_fn)
    model = perturb(vp.attach(block, "lora", targets=["net.0.proj", "net.2"], rank=4))
    if activation_fn == "geglu":  # x = a · GELU(gate): a product, which keeps its operands; nothing is rebuilt
        inputs = torch.randn(2, 40, 32)
        _, grads, storages, _ = run(model, inputs, monkeypatch, True)
        _, ref_grads, ref_storages, _ = run(model, inputs, monkeypatch, False)
        assert sum(storages.values()) == sum(ref_storages.values())
        assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
        return
    check_rebuilt(model, torch.randn(2, 40, 32), block.net[0], monkeypatch)


def test_a_conv_after_silu_keeps_its_input_anyway(monkeypatch):
    """A UNet ResNet block's conv1 input, SiLU(GroupNorm(h)): the base conv's backward keeps it (aten's convolution
    saves its input whether or not its weight trains), so the branch saving it adds nothing and nothing changes."""
    torch.manual_seed(0)
    activation = nn.SiLU()
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.GroupNorm(4, 16), activation, nn.Conv2d(16, 8, 3, padding=1))
    model = perturb(vp.attach(model, "lora", targets=["0", "3"], rank=2))
    inputs = torch.randn(2, 4, 12, 12)
    _, grads, storages, act_out = run(model, inputs, monkeypatch, True, activation)
    _, ref_grads, ref_storages, _ = run(model, inputs, monkeypatch, False, activation)
    assert act_out.untyped_storage().data_ptr() in storages
    assert sum(storages.values()) == sum(ref_storages.values())
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_dropout_on_the_branch_input_saves_what_the_branch_saw(monkeypatch):
    torch.manual_seed(0)
    activation = nn.GELU()
    model = nn.Sequential(nn.Linear(24, 48), activation, nn.Linear(48, 12))
    model = perturb(vp.attach(model, "lora", targets=["2"], rank=3, dropout=0.5))
    model.train()
    torch.manual_seed(1)
    _, grads, storages, act_out = run(model, torch.randn(8, 24), monkeypatch, True, activation)
    torch.manual_seed(1)
    _, ref_grads, ref_storages, _ = run(model, torch.randn(8, 24), monkeypatch, False, activation)
    assert sum(storages.values()) == sum(ref_storages.values())
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_keep_input_stands_aside():
    u = torch.randn(6, 8, requires_grad=True) * 1.0
    x = F.gelu(u)
    kept, rebuild = saved_input.keep_input(x)
    assert rebuild is not None and kept.untyped_storage().data_ptr() == u.untyped_storage().data_ptr()
    assert torch.equal(saved_input.kept_value(kept, rebuild), x)
    # a view of the activation's output, a detached tensor, and a leaf are saved as they are
    for tensor in (x[:3], x.t(), x.detach(), u):
        assert saved_input.keep_input(tensor)[1] is None
    # saved-tensor hooks active now (checkpointing, offloading) or on the activation's saved input
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert saved_input.keep_input(x)[1] is None
        hooked = F.gelu(u)
    assert saved_input.keep_input(hooked)[1] is None
    # the activation's input changed in place since: the node's copy is stale, x is kept
    v = torch.randn(6, 8, requires_grad=True) * 1.0
    y = F.silu(v)
    with torch.no_grad():
        v.add_(1.0)
    assert saved_input.keep_input(y)[1] is None


def test_under_saved_tensor_hooks_the_branch_saves_its_input():
    """Checkpointing and offloading decide what is kept through their hooks: the branch hands them x, as before."""
    model, outputs = mlp(nn.GELU()), []
    model[1].register_forward_hook(lambda m, a, o: outputs.append(o))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        out = model(torch.randn(4, 24))
    assert outputs[0].untyped_storage().data_ptr() in packed
    out.sum().backward()


def test_input_of_a_frozen_down_factor_is_not_saved(monkeypatch):
    """CLIP-SVD's factorized path trains the singular values only: the branch input serves no gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 12))
    vp.attach(model, "svd", targets=["1"], path="factorized")
    perturb(model)
    x = torch.randn(5, 24)
    hidden = model[0](x)
    storages = saved_storages(model[1](hidden.requires_grad_(True)))
    assert hidden.untyped_storage().data_ptr() not in storages
    _, grads, _, _ = run(model, x, monkeypatch, True)
    _, ref_grads, _, _ = run(model, x, monkeypatch, False)
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_first_order_only():
    model = mlp(nn.GELU())
    x = torch.randn(4, 24, requires_grad=True)
    grad, = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
