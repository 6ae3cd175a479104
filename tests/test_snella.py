"""SNELLA / SNELL: kernels, the sparsifier, the budget schedule and allocation, the exact start, memory,
and training with the schedule driven to its end on every supported model family. Exactness of
merge/unmerge/detach/save/load on every layer kind and family is covered by test_layers / test_families."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from conftest import Wrap, max_rel, perturb
from visionpeft.core import adapted_layers
import importlib

from visionpeft.methods.snella_kernel import distance_kernel, kernel_terms, kernel_value, softmax_mixture
from visionpeft.methods.snella_schedule import allocate, scheduled_budget
from visionpeft.methods.snella_sparse import keep_largest, select_largest
from visionpeft.models import build


def methods_of(model):
    return [m for _, layer in adapted_layers(model) for _, _, m in layer.vp_methods()]


def nonzero_fraction(model):
    """Global fraction of non-zero ΔW entries over every targeted weight."""
    nonzero = total = 0
    for _, layer in adapted_layers(model):
        for slot in layer.vp_adapters["default"]:
            delta = layer.vp_delta("default", slot)
            nonzero += int((delta != 0).sum())
            total += delta.numel()
    return nonzero / total


def train(model, loss_fn, total_steps, lr=1e-2):
    optimizer = torch.optim.AdamW(vp.trainable_parameters(model).values(), lr=lr)
    for step in range(1, total_steps + 1):
        loss_fn(model).backward()
        optimizer.step()
        vp.step(model, step, total_steps)  # after optimizer.step(), before zero_grad(): reads the gradients
        optimizer.zero_grad(set_to_none=True)
    return model


# --- kernels and sparsifier ------------------------------------------------------------------------
def test_distance_kernel_matches_its_formula_and_identical_pieces_cancel_exactly():
    inner, outer = torch.randn(2, 7, 3), torch.randn(2, 5, 3)
    expected = sum(w * (outer[p][:, None, :] - inner[p][None, :, :]).norm(dim=-1) for p, w in enumerate((0.1, -0.1)))
    assert torch.allclose(distance_kernel(inner, outer), expected, atol=1e-6)
    same_in, same_out = inner[:1].expand(2, -1, -1), outer[:1].expand(2, -1, -1)
    assert torch.equal(distance_kernel(same_in, same_out), torch.zeros(5, 7))


@pytest.mark.parametrize("mixture", [None, torch.tensor([0.7, 1.3, 0.2])])
def test_the_in_place_forward_value_equals_the_kernel_terms_bit_for_bit(mixture):
    inner, outer = torch.randn(2, 33, 3), torch.randn(2, 21, 3)
    assert torch.equal(kernel_value(inner, outer, mixture), kernel_terms(inner, outer, mixture).value)


def test_softmax_mixture_matches_its_formula_and_is_exactly_zero_at_zero():
    k = torch.randn(6, 4)
    scale, temperature, shift = torch.tensor(0.7), torch.tensor(1.3), torch.tensor(0.2)
    expected = k + scale * (torch.softmax(k / temperature, dim=0) - 1 / 6) + shift  # softmax over outputs
    assert torch.allclose(softmax_mixture(k, scale, temperature, shift), expected, atol=1e-6)
    zero = torch.zeros(384, 1536)
    assert torch.equal(softmax_mixture(zero, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0)), zero)


@pytest.mark.parametrize("budget", [0, 1, 7, 12, 19, 20])
def test_keep_largest_keeps_exactly_the_largest_entries(budget):
    k = torch.randn(4, 5)
    kept = keep_largest(k, budget)
    assert int((kept != 0).sum()) == budget
    if 0 < budget < 20:
        assert kept[kept != 0].abs().min() >= k[kept == 0].abs().max()
        assert torch.equal(kept[kept != 0], k[kept != 0])
    ties = keep_largest(torch.ones(4, 5), 7)  # ties never keep more than the budget
    assert int((ties != 0).sum()) == 7


def test_keep_largest_beyond_torch_quantile_limit():
    k = torch.randn(4097, 4097)  # 2^24 + 8193 entries: torch.quantile refuses this
    assert int((keep_largest(k, 1000) != 0).sum()) == 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("numel,budget", [(1000, 1), (1000, 300), (1000, 999), (70000, 21000)])
def test_select_largest_keeps_exactly_the_largest(dtype, numel, budget):
    magnitude = torch.randn(numel, dtype=torch.float64).abs().to(dtype)
    mask = select_largest(magnitude, budget).mask(magnitude).bool()
    assert int(mask.sum()) == budget
    assert magnitude[mask].min() >= magnitude[~mask].max()


def test_select_largest_breaks_ties_at_the_threshold_in_flat_order_and_a_second_mask_agrees():
    magnitude = torch.tensor([3.0, 2.0, 1.0, 2.0, 2.0, 0.5, 2.0])
    selection = select_largest(magnitude, 3)
    assert selection.mask(magnitude).tolist() == [True, True, False, True, False, False, False]
    assert selection.mask(magnitude.clone()).tolist() == selection.mask(magnitude).tolist()  # what backward recomputes
    assert select_largest(magnitude, 5).mask(magnitude).sum() == 5  # every tie kept: no tie-breaking needed
    assert select_largest(magnitude, 7).mask(magnitude) is None and not select_largest(magnitude, 0).mask(magnitude).any()


def test_a_step_builds_the_kernel_once_in_forward_and_once_in_backward_and_selects_once(monkeypatch):
    snella = importlib.import_module("visionpeft.methods.snella_sparse")
    calls = {"kernel_value": 0, "kernel_terms": 0, "select_largest": 0}
    for name in calls:
        def counted(*args, _original=getattr(snella, name), _name=name):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(snella, name, counted)
    model = vp.attach(Wrap(nn.Linear(24, 40)), "snella", targets=["layer"], rank=4, density=0.3, init_density=0.3,
                      path="weight")
    perturb(model)
    model(torch.randn(3, 24, requires_grad=True)).pow(2).sum().backward()
    # forward: the value alone; backward: the rebuild of W + ΔW hands its terms to the gradient
    assert calls == {"kernel_value": 1, "kernel_terms": 1, "select_largest": 1}
    assert all(p.grad is not None for p in vp.trainable_parameters(model).values())


# --- schedule and allocation -----------------------------------------------------------------------
def test_cubic_budget_schedule():
    args = dict(total_steps=100, initial=1000, target=200, warmup=0.1, final=0.2)
    assert scheduled_budget(0, **args) == scheduled_budget(10, **args) == 1000
    assert scheduled_budget(45, **args) == 200 + int(800 * 0.5 ** 3)
    assert scheduled_budget(80, **args) == scheduled_budget(100, **args) == 200
    budgets = [scheduled_budget(s, **args) for s in range(101)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))


def _reference_schedule(step, total_step, initial_warmup, final_warmup, mask_interval, init_volume, target_volume):
    """The reference's global schedule (SNELL code, ``Allocator.schedule_threshold``) on integer volumes:
    (budget, whether to re-allocate)."""
    if step <= initial_warmup:
        return init_volume, False
    if step > total_step - final_warmup:
        return target_volume, True
    coeff = 1 - (step - initial_warmup) / (total_step - final_warmup - initial_warmup)
    return int(target_volume + (init_volume - target_volume) * coeff ** 3), step % mask_interval == 0


@pytest.mark.parametrize("total,warmup,final,interval", [(50, 0.1, 0.2, 3), (40, 0.0, 0.0, 1), (30, 0.2, 0.1, 4),
                                                         (23, 0.1, 0.3, 5)])
def test_reallocation_happens_at_the_references_steps_with_its_budget(total, warmup, final, interval):
    model = vp.attach(nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8)), "snella", targets=[nn.Linear],
                      rank=4, density=0.3, init_density=0.9, warmup=warmup, final=final, interval=interval)
    capacities = [40 * 24, 8 * 40]
    initial, target = sum(math.floor(0.9 * n) for n in capacities), math.floor(0.3 * sum(capacities))
    start, end_phase = round(warmup * total), round(final * total)
    expected = initial
    for step in range(1, total + 1):
        vp.step(model, step, total)
        budget, reallocate = _reference_schedule(step, total, start, end_phase, interval, initial, target)
        if reallocate:
            expected = budget
        assert sum(int(m.budget) for m in methods_of(model)) == expected, step
    assert expected == target


def test_allocation_is_proportional_capped_and_exact():
    assert allocate(100, [1.0, 3.0], [1000, 1000]) == [25, 75]
    assert allocate(100, [1.0, 9.0], [1000, 40]) == [60, 40]  # the full layer's share goes to the other
    assert allocate(5, [0.0, 0.0, 0.0], [10, 10, 10]) in ([2, 2, 1], [2, 1, 2], [1, 2, 2])  # no scores: uniform
    assert sum(allocate(7, [1e-9, 1.0, float("nan")], [3, 3, 3])) == 7
    assert allocate(50, [1.0, 1.0], [10, 10]) == [10, 10]  # never more than the capacity


# --- attaching: exact start, delta, options --------------------------------------------------------
SMALL_LAYERS = [(lambda: nn.Linear(12, 20), (2, 3, 12)), (lambda: nn.Conv2d(3, 8, 3, padding=1), (2, 3, 6, 6))]


@pytest.mark.parametrize("kernel", ["distance", "distance+softmax"])
@pytest.mark.parametrize("make,shape", SMALL_LAYERS)
def test_exact_start_and_delta_is_the_masked_kernel(kernel, make, shape):
    base = Wrap(make())
    x = torch.randn(shape)
    y0 = base(x)
    model = vp.attach(copy.deepcopy(base), "snella", targets=["layer"], rank=4, kernel=kernel, density=0.3, init_density=0.4)
    assert torch.equal(model(x), y0)
    method = model.layer.vp_adapters["default"]["weight"]
    assert torch.equal(method.in_pieces[0], method.in_pieces[1]) and torch.equal(method.out_pieces[0], method.out_pieces[1])
    perturb(model)
    kernel_matrix = distance_kernel(method.in_pieces, method.out_pieces)
    if kernel == "distance+softmax":
        a, gamma, beta = method.mixture
        kernel_matrix = softmax_mixture(kernel_matrix, a, gamma, beta / kernel_matrix.shape[1])
    budget = int(0.4 * method.numel)
    assert torch.equal(method.delta().reshape(kernel_matrix.shape), keep_largest(kernel_matrix, budget))
    assert int((method.delta() != 0).sum()) == budget
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.layer.weight += method.delta()
    assert max_rel(model(x), reference(x)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_factors_and_exact_start(dtype):
    base = Wrap(nn.Linear(16, 8)).to(dtype)
    x = torch.randn(4, 16, dtype=dtype)
    model = vp.attach(copy.deepcopy(base), "snella", targets=["layer"], rank=2)
    assert model.layer.vp_adapters["default"]["weight"].in_pieces.dtype == torch.float32
    assert torch.equal(model(x), base(x))
    perturb(model)
    assert model(x).dtype == dtype


@pytest.mark.parametrize("options,fragment", [
    (dict(rank=3), "rank=3"),
    (dict(rank=0), "rank=0"),
    (dict(density=0), "density=0"),
    (dict(density=1.5), "density=1.5"),
    (dict(density=0.5, init_density=0.2), "init_density=0.2"),
    (dict(kernel="rbf"), "kernel='rbf'"),
    (dict(betas=(0.85,)), "betas"),
    (dict(betas=(0.85, 1.0)), "betas"),
    (dict(warmup=0.6, final=0.5), "warmup=0.6"),
    (dict(interval=0), "interval=0"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(path="fast"), "path='fast'"),
    (dict(sparsity=0.5), "sparsity"),
])
def test_bad_options_name_the_value_and_what_is_allowed(options, fragment):
    model = Wrap(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="allowed|valid options") as err:
        vp.attach(model, "snella", targets=["layer"], **options)
    assert fragment in str(err.value)
    assert type(model.layer) is nn.Linear


def test_snell_is_the_fixed_density_distance_configuration():
    with pytest.raises(ValueError, match="kernel"):
        vp.attach(Wrap(nn.Linear(4, 4)), "snell", targets=["layer"], kernel="distance")
    model = vp.attach(Wrap(nn.Linear(10, 10)), "snell", targets=["layer"], rank=2, density=0.25)
    method = model.layer.vp_adapters["default"]["weight"]
    assert method.mixture is None and method.current_density == 0.25
    train(model, lambda m: m(torch.randn(4, 10)).pow(2).mean(), total_steps=3)
    assert method.current_density == 0.25, "snell does not re-allocate"
    assert int((method.delta() != 0).sum()) == 25, "a masked layer trains from the exact zero start"


def test_autocast_forward_builds_the_same_float32_delta():
    model = vp.attach(Wrap(nn.Linear(32, 48)), "snella", targets=["layer"], rank=4, init_density=0.3, density=0.3)
    perturb(model)
    method = model.layer.vp_adapters["default"]["weight"]
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert method.delta().dtype == torch.float32
        out = model(x)
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in method.parameters())
    assert max_rel(out.float(), F.linear(x, model.layer.weight + method.delta(), model.layer.bias)) < 2e-2


# --- memory -------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(256, 512), (3, 256)),
                                        (lambda: nn.Conv2d(64, 128, 3, padding=1), (1, 64, 4, 4))])
def test_no_weight_sized_tensor_is_kept_for_backward(make, shape):
    layer = make()
    model = vp.attach(Wrap(layer), "snella", targets=["layer"], rank=4, init_density=0.5, density=0.5)
    perturb(model)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(shape, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward keeps for backward
        out = model(x)
    out.sum().backward()
    assert sum(1 for s in saved if s >= layer.weight.numel()) <= 1  # the frozen W itself, needed for dL/dx
    assert all(p.grad is not None for p in vp.trainable_parameters(model).values())


def reference_delta(method):
    """ΔW through autograd and plain torch ops (norms, torch.softmax), on the entries the method keeps."""
    inner, outer = method.in_pieces, method.out_pieces
    kernel = sum(w * (outer[p][:, None, :] - inner[p][None, :, :]).norm(dim=-1) for p, w in enumerate((0.1, -0.1)))
    if method.mixture is not None:
        a, gamma, beta = method.mixture
        kernel = kernel + a * (torch.softmax(kernel / gamma, dim=0) - 1 / kernel.shape[0]) + beta / kernel.shape[1]
    kept = method.delta().detach().reshape(kernel.shape) != 0
    return torch.where(kept, kernel, 0.0)


@pytest.mark.parametrize("make,shape", SMALL_LAYERS + [(lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2), (2, 4, 6, 6))])
@pytest.mark.parametrize("path", ["activation", "weight"])
@pytest.mark.parametrize("kernel", ["distance", "distance+softmax"])
def test_gradients_match_autograd_through_the_delta(kernel, make, shape, path):
    base = make()
    model = vp.attach(Wrap(copy.deepcopy(base)), "snella", targets=["layer"], rank=4, init_density=0.6, density=0.6,
                      path=path, kernel=kernel)
    perturb(model)
    method = model.layer.vp_adapters["default"]["weight"]
    x = torch.randn(shape, requires_grad=True)
    out = model(x)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    got = [p.grad.clone() for p in method.parameters()] + [x.grad.clone()]
    method.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_()
    op = F.linear if isinstance(base, nn.Linear) else base._conv_forward
    (op(x2, base.weight + reference_delta(method).view_as(base.weight), base.bias) * probe).sum().backward()
    expected = [p.grad for p in method.parameters()] + [x2.grad]
    assert all(max_rel(g, e) < 1e-4 for g, e in zip(got, expected))


def test_a_zero_distance_passes_no_gradient_instead_of_an_infinite_one():
    model = vp.attach(Wrap(nn.Linear(6, 5)), "snella", targets=["layer"], rank=2, density=1.0, kernel="distance")
    perturb(model)
    method = model.layer.vp_adapters["default"]["weight"]
    with torch.no_grad():  # out_p[0] == in_p[0] in both pieces: D²[0, 0] is clamped
        method.out_pieces[:, 0] = method.in_pieces[:, 0]
    model(torch.randn(3, 6)).pow(2).sum().backward()
    grads = [method.in_pieces.grad, method.out_pieces.grad]
    assert all(torch.isfinite(g).all() for g in grads)
    method.zero_grad(set_to_none=True)
    reference = reference_delta(method)  # autograd's, with entry (0, 0) cut out of the graph
    kept = torch.ones_like(reference)
    kept[0, 0] = 0
    probe = torch.randn(5, 6)
    (method.delta() * probe).sum().backward()
    got = [method.in_pieces.grad.clone(), method.out_pieces.grad.clone()]
    method.zero_grad(set_to_none=True)
    (reference * kept * probe).sum().backward()
    assert all(max_rel(g, e) < 1e-4 for g, e in zip(got, [method.in_pieces.grad, method.out_pieces.grad]))


# --- allocation in training ---------------------------------------------------------------------
class TwoBranches(nn.Module):
    """Only ``important`` matters for the output; ``minor`` is scaled down a thousandfold."""

    def __init__(self):
        super().__init__()
        self.important = nn.Linear(16, 16)
        self.minor = nn.Linear(16, 16)

    def forward(self, x):
        return self.important(x) + 1e-3 * self.minor(x)


def test_budget_moves_to_the_layer_that_matters_and_global_density_reaches_the_target(tmp_path):
    x, target = torch.randn(32, 16), torch.randn(32, 16)
    base = TwoBranches()
    model = vp.attach(copy.deepcopy(base), "snella", targets=["important", "minor"], rank=4, density=0.3, warmup=0.1,
                      final=0.2, interval=1)
    assert nonzero_fraction(model) == 0  # exact start
    train(model, lambda m: F.mse_loss(m(x), target), total_steps=30)
    report = vp.sparsity_report(model)
    assert set(report) == {"important:weight", "minor:weight"}
    assert report["important:weight"] > 2 * report["minor:weight"]
    assert (report["important:weight"] + report["minor:weight"]) / 2 <= 0.3
    assert 0 < nonzero_fraction(model) <= 0.3
    vp.save(model, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path)
    assert vp.sparsity_report(loaded) == report
    assert torch.equal(loaded(x), model(x))


FAMILIES = ["timm_vit", "open_clip", "diffusers_unet", "llama"]


def outputs(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return torch.cat([t.flatten() for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_to_the_target_density(family):
    base, inputs = build(family)
    base.eval()
    y0 = outputs(base, inputs)
    model = vp.attach(copy.deepcopy(base), "snella", rank=2, density=0.4, warmup=0.0, final=0.25, interval=1)
    assert torch.equal(outputs(model, inputs), y0)
    if family in ("timm_vit", "open_clip"):  # fused q/k/v adapted as three blocks
        assert any(key.endswith(".2") for key in vp.sparsity_report(model))
    train(model, lambda m: outputs(m, inputs).float().pow(2).mean(), total_steps=4, lr=1e-2)
    densities = vp.sparsity_report(model)
    assert len(densities) == len(methods_of(model))
    assert 0 < nonzero_fraction(model) <= 0.4
    assert not torch.equal(outputs(model, inputs), y0)
