"""NOLA: coefficients over seeded random bases; bases never stored, never kept for backward, same in every process."""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import Wrap, max_rel, perturb
from visionpeft.methods.nola import derived_seed


class Two(nn.Module):
    def __init__(self, out=12):
        super().__init__()
        self.first, self.second = nn.Linear(10, 10), nn.Linear(10, out)

    def forward(self, x):
        return self.second(self.first(x))


def attach(model, **options):
    return vp.attach(model, "nola", targets=["first", "second"], **dict(dict(rank=2, num_basis=(6, 5)), **options))


def method(model, layer="first"):
    return getattr(model, layer).vp_adapters["default"]["weight"]


def stacked(bases):
    return torch.stack([bases.basis(i) for i in range(bases.count)])


def test_attach_is_exact_and_trains_k_plus_l_per_layer():
    base = Two()
    x = torch.randn(3, 10)
    model = attach(copy.deepcopy(base))
    assert torch.equal(model(x), base(x))
    trainable = vp.trainable_parameters(model)
    assert sorted(p.numel() for p in trainable.values()) == [5, 5, 6, 6]
    assert "22" in vp.summary(model).split("trainable params:")[1].split("||")[0]


def test_delta_is_the_combination_of_the_bases_and_gradients_agree():
    """Against the bases written out one by one (windows of the layer's sequence) and summed directly."""
    model = attach(Two())
    perturb(model)
    m, second = method(model), method(model, "second")
    alpha = m.nola_alpha.detach().clone().requires_grad_()
    beta = m.nola_beta.detach().clone().requires_grad_()
    down = m.initial_A + torch.einsum("k,kri->ri", alpha, stacked(m.bases_A))
    up = torch.einsum("l,lor->or", beta, stacked(m.bases_B))
    assert max_rel(m.delta(), m.scale * up @ down) < 1e-6
    x, target = torch.randn(4, 10), torch.randn(4, 12)
    (model(x) - target).pow(2).sum().backward()
    hidden = nn.functional.linear(x, model.first.weight + m.scale * up @ down, model.first.bias)
    explicit = nn.functional.linear(hidden, model.second.weight + second.delta().detach(), model.second.bias)
    (explicit - target).pow(2).sum().backward()
    assert max_rel(m.nola_alpha.grad, alpha.grad) < 1e-5 and max_rel(m.nola_beta.grad, beta.grad) < 1e-5
    assert max_rel(model(x), explicit) < 1e-6


def test_bases_depend_on_seed_and_layer_name_and_not_on_the_global_rng():
    plain = Two(out=10)
    state = torch.get_rng_state()
    model = attach(plain)
    model(torch.zeros(1, 10)).sum().backward()
    assert torch.equal(torch.get_rng_state(), state), "the global RNG is never used"
    first, second = stacked(method(model).bases_A), stacked(method(model, "second").bases_A)
    assert not torch.equal(first, second), "layers of one shape get their own bases"
    assert torch.equal(stacked(method(attach(Two())).bases_A), first)
    assert not torch.equal(stacked(method(attach(Two(), seed=1)).bases_A), first)


def test_bases_are_identical_in_another_process():
    code = ("import torch, visionpeft as vp; from torch import nn\n"
            "torch.manual_seed(123)\n"
            "m = vp.attach(nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 12)), 'nola', targets=['0'], rank=2, "
            "num_basis=(6, 5))\n"
            "print(repr(m[0].vp_adapters['default']['weight'].bases_B.sequence.double().sum().item()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = vp.attach(nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 12)), "nola", targets=["0"], rank=2,
                     num_basis=(6, 5))
    sequence = here[0].vp_adapters["default"]["weight"].bases_B.sequence
    assert float(out[0]) == sequence.double().sum().item()
    expected = torch.rand(10 * 2 + 5 - 1, generator=torch.Generator().manual_seed(
        derived_seed(derived_seed(0, "0:weight"), "B"))) * 2 - 1
    assert torch.equal(sequence, expected), "the seed is a hash of the adapter's seed and the layer's name"


def test_backward_keeps_no_basis():
    layer = vp.attach(Wrap(nn.Linear(32, 48)), "nola", targets=["layer"], rank=4, num_basis=(64, 64))
    m = layer.layer.vp_adapters["default"]["weight"]
    perturb(layer)
    saved, dtypes = [], set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or dtypes.add(t.dtype) or t,
                                                  lambda t: t):
        loss = layer(torch.randn(5, 32)).sum()
    loss.backward()
    assert m.nola_alpha.grad is not None and m.nola_beta.grad.abs().sum() > 0
    # x, the rank-sized activations, the factors and the sequences (live buffers): far below the bases themselves
    assert sum(saved) < 64 * 4 * 32 / 4, f"kept {sum(saved)} values for backward; the A bases alone are {64 * 4 * 32}"
    assert dtypes == {torch.float32}, f"no float64 or complex FFT spectra are kept for backward, got {dtypes}"


def test_checkpoint_holds_coefficients_only_and_refuses_another_shape(tmp_path):
    base = Two()
    model = attach(copy.deepcopy(base), num_basis=(1024, 1024))
    perturb(model)
    x = torch.randn(2, 10)
    y = model(x)
    vp.save(model, tmp_path)
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert size < 2 * 2048 * 4 + 2048, f"{size} bytes: more than the coefficients"
    assert torch.equal(vp.load(copy.deepcopy(base), tmp_path)(x), y)
    other = Two(out=13)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="shape"):
        vp.load(other, tmp_path)
    assert not hasattr(other.second, "vp_adapters") and type(other.second) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("options,match", [
    (dict(num_basis=(3,)), r"num_basis=\(3,\).*two ints >= 1"),
    (dict(num_basis=(0, 2)), r"num_basis=\(0, 2\).*two ints >= 1"),
    (dict(num_basis=(2.0, 2)), r"num_basis=\(2.0, 2\)"),
    (dict(seed=-1), r"seed=-1.*an int >= 0"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        attach(Two(), **options)
