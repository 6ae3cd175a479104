"""SaRA: selection of small weights, exact start, sparse backprop, rank penalty, progressive re-selection,
weighted merges and base-weight safety on load."""
import copy
import importlib
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from conftest import RecordCalls, Wrap, max_rel, perturb
from visionpeft.methods.sara import SaRA
from visionpeft.models import build


def mlp():
    return nn.Sequential(nn.Linear(96, 80), nn.GELU(), nn.Linear(80, 72), nn.GELU(), nn.Linear(72, 4))


def instances(model, adapter="default"):
    return [m for _, layer in model.named_modules() if hasattr(layer, "vp_adapters")
            for a, _, m in layer.vp_methods() if a == adapter]


def base_weights(model):
    return [p for n, p in model.named_parameters() if ".vp_adapters." not in f".{n}"]


@pytest.mark.parametrize("path", ["auto", "sparse"])
def test_exact_start_and_delta_support_is_the_small_weights(path):
    base = mlp()
    x = torch.randn(6, 96)
    theta = 0.01
    model = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], threshold=theta, path=path)
    assert torch.equal(model(x), base(x))
    perturb(model, std=1.0)
    for i in (0, 2, 4):
        small = base[i].weight.abs() < theta
        method = model[i].vp_adapters["default"]["weight"]
        assert method.values.numel() == int(small.sum()) > 0
        delta = model[i].vp_delta("default", "weight")
        assert torch.all(delta[~small] == 0) and torch.all(delta[small] != 0)
    assert set(vp.trainable_parameters(model)) == {f"{i}.vp_adapters.default.weight.values" for i in (0, 2, 4)}


def test_density_and_budget_select_exactly_that_many_of_the_smallest():
    base = mlp()
    total = sum(base[i].weight.numel() for i in (0, 2, 4))
    for options, keep in ((dict(density=0.1), round(0.1 * total)), (dict(budget=321), 321), ({}, round(0.05 * total))):
        model = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], **options)
        methods = instances(model)
        assert sum(m.values.numel() for m in methods) == keep
        theta = methods[0].theta.item()
        magnitudes = torch.cat([base[i].weight.detach().abs().flatten() for i in (0, 2, 4)])
        assert int((magnitudes < theta).sum()) == keep
        assert all(m.theta.item() == theta for m in methods), "one global threshold"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_density_and_budget_select_exactly_the_k_smallest_in_float32_and_float64(dtype):
    # float64 magnitudes that round to one float32 value: 1 - 2^-40 and 1 - 2^-41 are both 1.0 in float32
    close = nn.Linear(4, 3, bias=False).to(dtype)
    with torch.no_grad():
        close.weight.copy_(torch.tensor([[1 - 2**-40, 1 - 2**-41, 0.5, 2.0]] * 3, dtype=torch.float64))
    model = vp.attach(Wrap(close), "sara", targets=["layer"], budget=3)
    assert instances(model)[0].values.numel() == 3 and torch.all(instances(model)[0].original == 0.5)
    # distinct magnitudes (k/3 · 1e-3, random signs), in float64 mostly between two float32 values
    generator = torch.Generator().manual_seed(0)
    base = mlp().to(dtype)
    with torch.no_grad():
        for i in (0, 2, 4):
            n = base[i].weight.numel()
            ranks = torch.randperm(n, generator=generator).to(dtype) + 1 + 10**4 * i
            signs = torch.randint(2, (n,), generator=generator).to(dtype) * 2 - 1
            base[i].weight.copy_((ranks / 3 * 1e-3 * signs).view_as(base[i].weight))
    magnitudes = torch.cat([base[i].weight.detach().abs().flatten() for i in (0, 2, 4)])
    assert magnitudes.unique().numel() == magnitudes.numel()
    offsets = torch.tensor([0] + [base[i].weight.numel() for i in (0, 2)]).cumsum(0)
    for options in (dict(budget=1), dict(budget=97), dict(budget=4321), dict(density=0.3)):
        model = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], **options)
        chosen = torch.cat([m.indices.long() + offset for m, offset in zip(instances(model), offsets)])
        # the reference: sort every targeted magnitude and take the first k positions
        keep = options.get("budget") or round(0.3 * magnitudes.numel())
        assert torch.equal(chosen, magnitudes.argsort()[:keep].sort().values)


@pytest.mark.parametrize("options, message", [
    (dict(threshold=0.1, density=0.1), "exactly one"),
    (dict(budget=10**9), "exceeds"),
    (dict(density=1.5), "density"),
    (dict(progressive_at=0.0), "progressive_at"),
    (dict(path="dense"), "path"),
])
def test_bad_options_raise_before_anything_changes(options, message):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        vp.attach(model, "sara", targets=[nn.Linear], **options)
    assert not hasattr(model[0], "vp_adapters") and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("path", ["sparse", "sampled", "weight"])
def test_sparse_backprop_leaves_no_dense_gradient_and_paths_agree(path):
    base = mlp()
    x = torch.randn(8, 96, requires_grad=True)
    reference = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], density=0.2, path="weight")
    perturb(reference)
    model = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], density=0.2, path=path)
    model.load_state_dict(reference.state_dict())
    assert max_rel(model(x), reference(x)) < 1e-6
    model(x).square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    reference(x).square().sum().backward()
    assert max_rel(grad_x, x.grad) < 1e-5
    for ours, theirs in zip(instances(model), instances(reference)):
        assert max_rel(ours.values.grad, theirs.values.grad) < 1e-5
    assert all(p.grad is None for p in base_weights(model))


def test_gradient_accumulation_equals_one_big_batch():
    base = mlp()
    x, y = torch.randn(8, 96), torch.randn(8, 4)
    big = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], density=0.2)
    perturb(big)
    halves = copy.deepcopy(big)
    F.mse_loss(big(x), y, reduction="sum").backward()
    for part in (slice(0, 4), slice(4, 8)):
        F.mse_loss(halves(x[part]), y[part], reduction="sum").backward()
    for one, two in zip(instances(big), instances(halves)):
        assert max_rel(two.values.grad, one.values.grad) < 1e-5
    torch.nn.utils.clip_grad_norm_(vp.trainable_parameters(halves).values(), 1e-3)
    assert torch.cat([m.values.grad for m in instances(halves)]).norm() <= 1e-3 * 1.0001


def test_rank_penalty_is_the_nuclear_norm_of_one_layer_and_reaches_the_values():
    model = vp.attach(mlp(), "sara", targets=[nn.Linear], density=0.3, lambda_rank=0.01)
    perturb(model)
    eligible = [m for m in instances(model) if m.rank_eligible]
    assert len(eligible) == 2  # the 4-row head is too small for a rank penalty
    expected = {}
    for method in eligible:
        matrix = torch.zeros(method.slot_shape).view(-1).index_put((method.indices.long(),), method.values.detach())
        expected[id(method)] = 0.01 * torch.linalg.svdvals(matrix.view(method.slot_shape)).sum().item()
    seen = set()
    for _ in range(12):
        penalty = vp.regularization(model)
        match = [k for k, v in expected.items() if abs(v - penalty.item()) < 1e-5 * v]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(expected), "the penalised layer is drawn at random"
    for method in eligible:
        method.values.grad = None
    vp.regularization(model).backward()
    grads = [m.values.grad for m in eligible]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) == 1
    assert all(p.grad is None for p in base_weights(model))
    assert vp.regularization(vp.attach(mlp(), "sara", targets=[nn.Linear], lambda_rank=0.0)).item() == 0


def _reference_rank_penalty(base_weight, method, mask, lambda_rank):
    """The reference's penalty on identical tensors: the dense parameter (W0 with the learned values at the
    selected entries), times its current mask, λ·Σσ by an SVD; returns the value and the gradient at the
    selected entries."""
    dense = base_weight.detach().clone().view(-1)
    dense[method.indices.long()] = method.current_values().detach()
    dense = dense.view(method.slot_shape).requires_grad_()
    penalty = lambda_rank * torch.linalg.svd(dense * mask, full_matrices=False).S.sum()
    penalty.backward()
    return penalty.item(), dense.grad.view(-1)[method.indices.long()]


def test_rank_penalty_after_reselection_is_the_references_on_the_entries_still_training():
    base = mlp()
    model = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], density=0.3, lambda_rank=0.01, progressive_at=0.5)
    perturb(model, std=0.02)
    eligible = [m for m in instances(model) if m.rank_eligible]
    with torch.no_grad():
        for m in eligible:
            m.values[::3] += 10 * m.theta.float()  # these grew past θ and freeze at re-selection
    initial_masks, grown = [], []
    for i, m in zip((0, 2), eligible):
        selected = torch.zeros(m.slot_shape, dtype=torch.bool).view(-1)
        selected[m.indices.long()] = True
        dense = base[i].weight.detach().clone().view(-1)
        dense[m.indices.long()] = m.values.detach()
        initial_masks.append(selected.view(m.slot_shape))
        # the reference's re-selection: the initial mask and |current value| < θ
        grown.append((selected & (dense.abs() < m.theta.float())).view(m.slot_shape))
    vp.step(model, 5, 10)
    for i, m, mask, initial in zip((0, 2), eligible, grown, initial_masks):
        assert int(mask.sum()) == m.trainable_entries() < m.values.numel()
        expected, expected_grad = _reference_rank_penalty(base[i].weight, m, mask, 0.01)
        m.values.grad = None
        penalty = m.rank_penalty()
        penalty.backward()
        assert abs(penalty.item() - expected) < 1e-5 * expected
        assert max_rel(m.values.grad, expected_grad) < 1e-4
        assert torch.all(m.values.grad[m.frozen] == 0)
        # before re-selection the mask is the initial one: the same as our penalty of all selected values
        unfrozen = copy.deepcopy(m)
        unfrozen.frozen.zero_()
        before, _ = _reference_rank_penalty(base[i].weight, m, initial, 0.01)
        assert abs(unfrozen.rank_penalty().item() - before) < 1e-5 * before


def test_a_drawn_layer_with_at_most_100_entries_still_training_adds_no_penalty_that_step():
    model = vp.attach(mlp(), "sara", targets=[nn.Linear], density=0.3, lambda_rank=0.01, progressive_at=0.5)
    first, second = [m for m in instances(model) if m.rank_eligible]
    with torch.no_grad():
        second.values[50:] += 10 * second.theta.float()  # all but 50 grow past θ
    vp.step(model, 5, 10)
    assert second.trainable_entries() == 50 and first.trainable_entries() > 100
    expected = first.rank_penalty().item()
    torch.manual_seed(0)
    penalties = [vp.regularization(model).item() for _ in range(24)]
    # as the reference: the layer is drawn among every 2-D slot with min(out, in) > 64, then skipped
    # for that step when no more than 100 of its entries still train
    assert all(p == 0 or abs(p - expected) < 1e-6 * expected for p in penalties)
    assert 0 < penalties.count(0) < len(penalties)


@pytest.mark.parametrize("path", ["auto", "sampled"])
def test_progressive_reselection_freezes_grown_entries_and_keeps_optimizer_state(path):
    model = vp.attach(mlp(), "sara", targets=[nn.Linear], density=0.2, progressive_at=0.5, path=path)
    methods = instances(model)
    with torch.no_grad():
        for m in methods:
            m.values[::3] += 10 * m.theta.float()  # these grew past θ
    x, y = torch.randn(8, 96), torch.randn(8, 4)
    optimizer = torch.optim.AdamW(vp.trainable_parameters(model).values(), lr=1e-2, weight_decay=0.1)

    def train_step():
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()

    vp.step(model, 4, 10)
    assert all(m.trainable_entries() == m.values.numel() for m in methods)
    train_step()
    grown = [(m.values.abs() >= m.theta).clone() for m in methods]
    states = [optimizer.state[m.values]["exp_avg"] for m in methods]
    vp.step(model, 5, 10)
    for m, g in zip(methods, grown):
        assert torch.equal(m.frozen, g) and m.trainable_entries() == int((~g).sum()) < m.values.numel()
    frozen_effective = [m.current_values()[m.frozen].clone() for m in methods]
    for _ in range(3):
        train_step()
        for m in methods:
            assert torch.all(m.values.grad[m.frozen] == 0)
    for m, before, state in zip(methods, frozen_effective, states):
        assert torch.equal(m.current_values()[m.frozen], before)
        assert optimizer.state[m.values]["exp_avg"] is state, "the optimizer's state carries on"
        assert not torch.all(m.values[~m.frozen] == m.original[~m.frozen]), "survivors still train"
    vp.step(model, 9, 10)  # re-selection happens once
    assert all(torch.equal(m.frozen, g) for m, g in zip(methods, grown))

    disabled = vp.attach(mlp(), "sara", targets=[nn.Linear], progressive_at=1.0)
    vp.step(disabled, 9, 10)
    assert all(m.trainable_entries() == m.values.numel() for m in instances(disabled))


def test_reselection_state_survives_save_and_load(tmp_path):
    base = mlp()
    model = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], density=0.2)
    perturb(model, std=0.05)
    vp.step(model, 5, 10)
    perturb(model, std=0.05)  # frozen entries must ignore this
    x = torch.randn(3, 96)
    vp.save(model, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), model(x))
    assert [m.trainable_entries() for m in instances(loaded)] == [m.trainable_entries() for m in instances(model)]


def test_loading_onto_other_base_weights_fails_and_leaves_the_model_untouched(tmp_path):
    base = mlp()
    model = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], density=0.2)
    perturb(model)
    vp.save(model, tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():  # a large (unselected) weight changes: same selection, different base
        flat = other[0].weight.view(-1)
        flat[flat.abs().argmax()] += 1.0
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="other base weights"):
        vp.load(other, tmp_path)
    assert not hasattr(other[0], "vp_adapters")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError):
        vp.load(mlp(), tmp_path)  # another random base: the selection does not even fit


def test_merge_with_strength_and_two_adapters_combined():
    base = mlp()
    x = torch.randn(4, 96)
    model = vp.attach(copy.deepcopy(base), "sara", targets=[nn.Linear], name="a", density=0.1)
    vp.attach(model, "sara", targets=[nn.Linear], name="b", threshold=0.02)
    perturb(model)
    d = {a: model[0].vp_delta(a, "weight") for a in ("a", "b")}
    both = model(x)
    vp.merge(model, scale=1.0)
    assert max_rel(model(x), both) < 1e-5
    vp.unmerge(model)
    with pytest.raises(ValueError, match="not attached"):
        vp.merge(model, scale={"a": 0.6, "c": 0.6})
    assert not model[0]._vp_merged
    vp.merge(model, scale={"a": 0.6, "b": 0.4})
    assert max_rel(model[0].weight, base[0].weight + 0.6 * d["a"] + 0.4 * d["b"]) < 1e-6
    vp.unmerge(model)
    assert max_rel(model[0].weight, base[0].weight) < 1e-6
    vp.merge(model, scale=1.5)
    assert max_rel(model[0].weight, base[0].weight + 1.5 * (d["a"] + d["b"])) < 1e-6


def test_targets_all_covers_every_tensor_including_attention_out_proj(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.scale = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return self.attn(self.norm(x), x, x)[0] * self.scale

    base = Block().eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    x = torch.randn(2, 3, 8)
    model = vp.attach(copy.deepcopy(base), "sara", targets="all", density=0.5).eval()
    assert torch.equal(model(x), base(x))
    slots = {n: list(m.vp_adapters["default"]) for n, m in model.named_modules() if hasattr(m, "vp_adapters")}
    assert slots == {"": ["scale"], "norm": ["weight", "bias"],
                     "attn": ["in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"]}
    assert sum(m.values.numel() for m in instances(model)) == round(0.5 * sum(p.numel() for p in base.parameters()))
    perturb(model)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for layer_name, names in slots.items():
            layer = model.get_submodule(layer_name)
            for slot in names:
                owner, attr = layer._vp_kind.parameter(reference.get_submodule(layer_name), slot)
                getattr(owner, attr).add_(layer.vp_delta("default", slot))
    expected = reference(x)
    assert max_rel(model(x), expected) < 1e-5
    model(x).sum().backward()
    assert all(p.grad is None for p in base_weights(model))
    vp.save(model, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="all"):
        vp.attach(loaded, "lora", targets=["attn"])
    with pytest.raises(ValueError, match="all"):
        vp.load(vp.attach(copy.deepcopy(base), "lora", targets=["attn"], name="other"), tmp_path)
    vp.detach(model, merge=True)
    assert type(model) is Block and max_rel(model(x), expected) < 1e-5
    with pytest.raises(ValueError, match="all"):
        vp.attach(vp.attach(copy.deepcopy(base), "lora", targets=["attn"]), "sara", targets="all")


@pytest.mark.parametrize("family", ["diffusers_unet", "timm_vit"])
def test_families_with_targets_all(family, tmp_path):
    base, inputs = build(family)
    base.eval()

    def run(m):
        out = m(**inputs) if isinstance(inputs, dict) else m(*inputs)
        return out.sample if hasattr(out, "sample") else out

    y0 = run(base)
    model = vp.attach(copy.deepcopy(base), "sara", targets="all")
    assert torch.equal(run(model), y0)
    total = sum(p.numel() for p in base.parameters())
    assert abs(sum(m.values.numel() for m in instances(model)) - round(0.05 * total)) <= 1
    perturb(model, std=0.3)
    y1 = run(model)
    assert max_rel(y1, y0) > 1e-4
    (run(model).square().mean() + vp.regularization(model)).backward()
    assert all(p.grad is None for p in base_weights(model))
    assert all(p.grad is not None for p in vp.trainable_parameters(model).values())
    vp.save(model, tmp_path)
    assert torch.equal(run(vp.load(copy.deepcopy(base), tmp_path)), y1)
    vp.detach(model, merge=False)
    assert torch.equal(run(model), y0) and set(model.state_dict()) == set(base.state_dict())


def test_half_precision_base_keeps_float32_values_and_exact_start():
    base = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    model = vp.attach(copy.deepcopy(base), "sara", targets=["0"], density=0.25)
    method = instances(model)[0]
    assert method.values.dtype == torch.float32 and method.original.dtype == torch.bfloat16
    assert torch.equal(model(x), base(x))
    assert not method.uses_activation_path(model[0]._vp_slots["weight"])


@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
    (lambda: __import__("transformers.pytorch_utils", fromlist=["Conv1D"]).Conv1D(12, 10), (3, 10)),
    (lambda: nn.Linear(10, 12), (3, 10)),
])
def test_weight_path_keeps_no_weight_copy_and_gradients_are_exact(layer, shape, monkeypatch):
    base = nn.Sequential(layer())
    model = vp.attach(copy.deepcopy(base), "sara", targets=["0"], density=0.3, path="weight")
    perturb(model)
    method = instances(model)[0]
    copies = []
    effective_weight = SaRA.effective_weight

    def spy(self, weight):
        out = effective_weight(self, weight)
        copies.append(weakref.ref(out))
        return out

    monkeypatch.setattr(SaRA, "effective_weight", spy)
    x = torch.randn(shape, requires_grad=True)
    y = model(x)
    assert copies and all(ref() is None for ref in copies), "the weight-sized copy is not kept for backward"
    y.square().sum().backward()
    kind = model[0]._vp_kind
    reference = (kind.read(base[0], "weight") + model[0].vp_delta("default", "weight")).detach().requires_grad_()
    reference_x = x.detach().clone().requires_grad_()
    kind.run(base[0], type(base[0]).forward, (reference_x,), {}, {"weight": reference}).square().sum().backward()
    assert max_rel(method.values.grad, reference.grad.reshape(-1)[method.indices.long()]) < 1e-5
    assert max_rel(x.grad, reference_x.grad) < 1e-5


@pytest.mark.parametrize("density, sampled", [(0.05, True), (0.5, False)])
def test_auto_path_computes_no_dense_weight_gradient_on_sparse_linear_layers(density, sampled, monkeypatch):
    sara_module = importlib.import_module("visionpeft.methods.sara_backprop")

    calls = []
    real = sara_module.sampled_weight_gradient
    monkeypatch.setattr(sara_module, "sampled_weight_gradient", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = vp.attach(mlp(), "sara", targets=[nn.Linear], density=density)
    loss = model(torch.randn(8, 96, requires_grad=True)).square().sum()
    with RecordCalls(torch.ops.aten.mm.default) as products:
        loss.backward()
    shapes = [(a.shape[0], b.shape[1]) for a, b in products.calls]
    weight_shapes = {tuple(layer.weight.shape) for layer in model if isinstance(layer, nn.Linear)}
    dense_weight_gradients = [s for s in shapes if s in weight_shapes]
    assert len(calls) == (3 if sampled else 0)
    assert bool(dense_weight_gradients) != sampled, shapes


def _tiny_vit():
    return build("timm_vit", embed_dim=32, depth=1, num_heads=2, img_size=16, patch_size=8)[0], torch.randn(2, 3, 16, 16), None


def _tiny_gpt2():
    return build("gpt2")[0], torch.randint(0, 50, (2, 7)), None


def _inplace_relu_mlp():
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(inplace=True), nn.Linear(40, 6)), torch.randn(3, 5, 24), [nn.Linear]


def _convs():
    """Stride, dilation, an even kernel with (asymmetric) "same" padding, a 1×1 conv."""
    return nn.Sequential(nn.Conv2d(6, 10, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(10, 8, (3, 2), dilation=2, padding="same"), nn.Conv2d(8, 4, 1)), \
        torch.randn(2, 6, 9, 11), [nn.Conv2d]


def _unbatched_conv():
    return nn.Sequential(nn.Conv2d(5, 7, 3, padding=(2, 1))), torch.randn(5, 6, 6), [nn.Conv2d]


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_gpt2, _inplace_relu_mlp, _convs, _unbatched_conv],
                         ids=["vit-fused-qkv", "gpt2-conv1d", "inplace-relu", "conv2d", "unbatched-conv2d"])
def test_sampled_gradient_equals_the_gathered_dense_one(make):
    """Fused q/k/v blocks (each its own rows of the output), transposed Conv1D weights, token-shaped inputs,
    an in-place op on the tapped output, and 2-D convs of several geometries."""
    torch.manual_seed(0)
    base, x, targets = make()
    base.eval()  # no dropout: both models must see the same function
    reference = vp.attach(copy.deepcopy(base), "sara", targets=targets, density=0.05, path="weight")
    perturb(reference)
    model = vp.attach(copy.deepcopy(base), "sara", targets=targets, density=0.05, path="sampled")
    model.load_state_dict(reference.state_dict())

    def loss(m):
        out = m(x)
        return (out.logits if hasattr(out, "logits") else out).square().mean()

    loss(model).backward()
    loss(reference).backward()
    ours, theirs = instances(model), instances(reference)
    assert len(ours) == len(theirs) >= 1
    for a, b in zip(ours, theirs):
        slot = _slot_of(model, a)
        assert a.gradient_from_output(slot) and not b.gradient_from_output(slot)
        if a.values.numel():  # a small layer may have nothing selected
            assert max_rel(a.values.grad, b.values.grad) < 1e-5
        else:
            assert a.values.grad.shape == (0,)
    assert any(a.values.numel() for a in ours)
    assert all(p.grad is None for p in base_weights(model))


def _slot_of(model, method):
    for _, layer in model.named_modules():
        if hasattr(layer, "vp_adapters"):
            for _, slot_name, m in layer.vp_methods():
                if m is method:
                    return layer._vp_slots[slot_name]
    raise LookupError


def test_sampled_gradient_on_a_bfloat16_base_is_float32_and_close():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    x = torch.randn(10, 64, dtype=torch.bfloat16)
    model = vp.attach(copy.deepcopy(base), "sara", targets=["0"], density=0.05, path="sampled")
    method = instances(model)[0]
    g = torch.randn(10, 48)
    model(x).backward(g.to(torch.bfloat16))
    exact = (g.double().t() @ x.double()).reshape(-1)[method.indices.long()]
    assert method.values.grad.dtype == torch.float32
    assert max_rel(method.values.grad, exact) < 1e-2


def test_sampled_gradient_falls_back_to_the_dense_product_when_compiling_fails(monkeypatch):
    sampled = importlib.import_module("visionpeft.layers.sampled")

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(sampled, "_compiled", broken)
    monkeypatch.setattr(sampled, "_compiled_works", None)
    g, x = torch.randn(9, 5), torch.randn(9, 7)
    rows, cols = torch.tensor([0, 2, 4]), torch.tensor([6, 0, 3])
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        first = sampled.sampled_weight_gradient(g, x, rows, cols, torch.float32)
    assert sampled._compiled_works is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = sampled.sampled_weight_gradient(g, x, rows, cols, torch.float32)
    expected = (g.t() @ x)[rows, cols]
    assert torch.allclose(first, expected) and torch.equal(first, second)


@pytest.mark.parametrize("layer", [lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                                   lambda: nn.Conv1d(4, 6, 3), lambda: nn.Conv3d(4, 6, 3)],
                         ids=["grouped", "reflect-padding", "conv1d", "conv3d"])
def test_sampled_path_leaves_other_convs_on_the_weight_path(layer):
    model = vp.attach(nn.Sequential(layer()), "sara", targets=["0"], density=0.05, path="sampled")
    assert not instances(model)[0].gradient_from_output(model[0]._vp_slots["weight"])
