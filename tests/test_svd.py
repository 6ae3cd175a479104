"""CLIP-SVD: singular-value tuning, its subspaces, counts, fused-projection split and basis safety."""
import copy

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import perturb
from visionpeft.methods.svd import _svd_by_gram, decompose
from visionpeft.models import build


def svd_instances(model):
    for _, layer in model.named_modules():
        if hasattr(layer, "vp_adapters"):
            yield from layer.vp_methods()


def test_delta_stays_in_the_singular_subspaces():
    layer = nn.Linear(12, 9)
    model = vp.attach(nn.Sequential(layer), "svd", targets=["0"], rank_ratio=0.5)
    method = model[0].vp_adapters["default"]["weight"]
    assert method.s.numel() == 5 and torch.equal(method.s.detach(), method.sigma)  # ceil(0.5 * 9) directions
    perturb(model, std=1.0)
    delta = model[0].vp_delta("default", "weight").double()
    u, _, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    u, v = u[:, :5], vh[:5].t()  # ceil(0.5 * 9) = 5 directions
    assert (delta - u @ (u.t() @ delta)).norm() < 1e-5 * delta.norm()
    assert (delta - (delta @ v) @ v.t()).norm() < 1e-5 * delta.norm()
    assert delta.norm() > 0.1


def test_decompose_is_exact_with_deterministic_signs():
    w = torch.randn(7, 3, 3, 3)
    u, sigma, v = decompose(w, 7)
    assert torch.allclose((u * sigma) @ v.t(), w.reshape(7, -1).double(), atol=1e-12)
    assert torch.all(u.gather(0, u.abs().argmax(0, keepdim=True)) > 0)
    u2, _, _ = decompose(-(-w), 7)
    assert torch.equal(u, u2)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30)])
def test_gram_path_agrees_with_lapack_svd_and_refuses_ill_conditioned(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    u, sigma, v = _svd_by_gram(w)
    reference_u, reference_sigma, reference_vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(sigma, reference_sigma, atol=1e-10)
    assert torch.allclose((u * reference_u).sum(0).abs(), torch.ones(min(shape), dtype=w.dtype), atol=1e-8)
    assert torch.allclose(u.t() @ u, torch.eye(min(shape), dtype=w.dtype), atol=1e-9)
    assert torch.allclose((u * sigma) @ v.t(), w, atol=1e-12)
    # squared condition number too large, a zero singular value, a zero matrix: the LAPACK SVD is used instead
    q1, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    for bad in ((q1 * torch.logspace(0, -7, 30, dtype=torch.float64)) @ q2.t(),
                torch.randn(30, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64),
                torch.zeros(5, 5, dtype=torch.float64)):
        assert _svd_by_gram(bad) is None
        u, sigma, v = decompose(bad, 30)
        assert torch.allclose((u * sigma) @ v.t(), bad, atol=1e-12)
        assert torch.allclose(sigma, torch.linalg.svdvals(bad), atol=1e-12)


def test_fused_projections_are_split_and_counts_match_min_dims():
    model, inputs = build("open_clip")
    vp.attach(model, "svd")
    expected = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            d = module.embed_dim
            expected += 3 * d + d  # q, k, v blocks of in_proj, and out_proj
        elif name.endswith(("mlp.c_fc", "mlp.c_proj")):
            expected += min(module.weight.shape)
    trainable = sum(p.numel() for p in vp.trainable_parameters(model).values())
    assert trainable == expected
    attn = model.transformer.resblocks[0].attn
    assert isinstance(attn.vp_adapters["default"]["in_proj"], nn.ModuleList)
    assert len(attn.vp_adapters["default"]["in_proj"]) == 3
    assert f"trainable params: {expected:,}" in vp.summary(model)
    vit, _ = build("timm_vit")
    vp.attach(vit, "svd")
    qkv = vit.blocks[0].attn.qkv.vp_adapters["default"]["weight"]
    assert [m.s.numel() for m in qkv] == [32, 32, 32]
    gpt, _ = build("gpt2")
    vp.attach(gpt, "svd")
    assert [m.s.numel() for m in gpt.transformer.h[0].attn.c_attn.vp_adapters["default"]["weight"]] == [32, 32, 32]


def test_conv_uses_the_kernel_reshape():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    model = vp.attach(nn.Sequential(conv), "svd", targets=["0"])
    method = model[0].vp_adapters["default"]["weight"]
    assert method.U.shape == (6, 6) and method.V.shape == (36, 6)


def test_train_bias_trains_and_saves_biases(tmp_path):
    base, inputs = build("open_clip")
    model = vp.attach(copy.deepcopy(base), "svd", train_bias=True)
    trainable = vp.trainable_parameters(model)
    assert "transformer.resblocks.0.attn.in_proj_bias" in trainable
    assert "transformer.resblocks.0.attn.out_proj.bias" in trainable
    assert "transformer.resblocks.0.mlp.c_fc.bias" in trainable
    with torch.no_grad():
        model.transformer.resblocks[0].mlp.c_fc.bias.add_(1.0)
    vp.save(model, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded.transformer.resblocks[0].mlp.c_fc.bias, model.transformer.resblocks[0].mlp.c_fc.bias)
    assert loaded.transformer.resblocks[0].mlp.c_fc.bias.requires_grad
    vp.detach(loaded, merge=False)
    assert not any(p.requires_grad for p in loaded.parameters()) or all(
        p.requires_grad for p in base.parameters())  # requires_grad restored to the base's


def test_loading_on_another_basis_fails_clearly_and_changes_nothing(tmp_path):
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model = vp.attach(copy.deepcopy(base), "svd", targets=["0", "2"])
    perturb(model)
    vp.save(model, tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other[0].weight.add_(torch.randn(8, 8) * 0.5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="another singular basis"):
        vp.load(other, tmp_path)
    assert set(other.state_dict()) == set(before) and all(torch.equal(other.state_dict()[k], before[k]) for k in before)
    same = vp.load(copy.deepcopy(base), tmp_path)
    x = torch.randn(3, 8)
    assert torch.equal(same(x), model(x))


def test_training_moves_only_singular_values():
    model = vp.attach(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)), "svd", targets=["0", "2"])
    params = vp.trainable_parameters(model)
    assert set(params) == {"0.vp_adapters.default.weight.s", "2.vp_adapters.default.weight.s"}
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    x, y = torch.randn(64, 6), torch.randint(0, 2, (64,))
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(b.grad is None for n, b in model.named_buffers())
