"""MoRA: the square size, the operators against the reference's semantics, the dense ΔW against the activation path."""
import copy

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import Wrap, max_rel, perturb
from visionpeft.methods.mora import square_size


def reference_type1(x, m, fan_in, out):
    """kongds/MoRA ``_apply_mora`` type 1, re-implemented from its semantics: pad by concatenating x's first
    entries, sum the r̂-chunks, apply M, tile and truncate."""
    r = m.shape[0]
    if fan_in % r:
        x = torch.cat([x, x[..., :r - fan_in % r]], dim=-1)
    z = x.view(*x.shape[:-1], -1, r).sum(-2) @ m.t()
    return torch.cat([z] * -(-out // r), dim=-1)[..., :out]


def reference_type6(x, m, fan_in, out):
    """Type 6: pad as above, rotate chunk c with cos/sin of c·10000^(-2t/r̂) (half-split pairs), apply M per chunk,
    concatenate, truncate (tile where short)."""
    r = m.shape[0]
    if fan_in % r:
        x = torch.cat([x, x[..., :r - fan_in % r]], dim=-1)
    chunks = x.view(*x.shape[:-1], -1, r)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    freqs = torch.outer(torch.arange(chunks.shape[-2]).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    rotated = chunks * emb.cos() + torch.cat((-chunks[..., r // 2:], chunks[..., :r // 2]), dim=-1) * emb.sin()
    y = (rotated @ m.t()).reshape(*x.shape[:-1], -1)[..., :out]
    if y.shape[-1] < out:
        y = torch.cat([y] * -(-out // y.shape[-1]), dim=-1)[..., :out]
    return y


def attached(fan_in, out, **options):
    base = Wrap(nn.Linear(fan_in, out))
    model = vp.attach(copy.deepcopy(base), "mora", targets=["layer"], **options)
    return base, model, model.layer.vp_adapters["default"]["weight"]


def test_square_size_matches_the_reference_budget():
    assert square_size(768, 768, 8, "sharing") == 111 and square_size(768, 768, 8, "rotation") == 110
    assert square_size(768, 3072, 8, "sharing") == 175 and square_size(768, 3072, 8, "rotation") == 174
    _, model, method = attached(768, 768, rank=8)
    assert method.mora_M.shape == (110, 110), "rank 8 defaults to rotation"
    assert vp.trainable_parameters(model)["layer.vp_adapters.default.weight.mora_M"].numel() == 110 * 110
    assert attached(24, 24, rank=64)[2].operator == "sharing", "ranks above 32 default to sharing"
    assert attached(24, 24, rank=32)[2].operator == "rotation"


@pytest.mark.parametrize("operator,reference", [("sharing", reference_type1), ("rotation", reference_type6)])
@pytest.mark.parametrize("fan_in,out", [(23, 29), (12, 40), (40, 12)])
def test_operators_match_the_reference_on_a_linear(operator, reference, fan_in, out):
    base, model, method = attached(fan_in, out, rank=2, operator=operator)
    x = torch.randn(3, 4, fan_in)
    assert torch.equal(model(x), base(x)), "M starts at zero: attaching changes nothing"
    perturb(model)
    expected = base(x) + reference(x, method.mora_M.detach(), fan_in, out)
    assert max_rel(model(x), expected) < 1e-5


@pytest.mark.parametrize("operator", ["sharing", "rotation", "truncation"])
@pytest.mark.parametrize("fan_in,out,rank", [(23, 29, 2), (8, 300, 8), (40, 6, 1)])
def test_dense_delta_equals_the_activation_path(operator, fan_in, out, rank):
    """Including r̂ > fan_in (8 → 300), where padding wraps the input more than once."""
    base, model, method = attached(fan_in, out, rank=rank, operator=operator)
    perturb(model)
    x = torch.randn(5, fan_in)
    assert max_rel(method.compressed_output(x), x @ method.delta().t()) < 1e-5
    assert max_rel(model(x), base(x) + x @ method.delta().t()) < 1e-5


def test_truncation_touches_only_the_leading_block():
    _, model, method = attached(30, 20, rank=1, operator="truncation")
    perturb(model)
    r = method.size
    delta = method.delta()
    assert torch.equal(delta[:r, :r], method.mora_M.detach()[:r, :r])
    assert delta[r:].abs().sum() == 0 and delta[:, r:].abs().sum() == 0


def test_activation_path_builds_no_dense_delta(monkeypatch):
    _, model, method = attached(16, 24, rank=2)
    monkeypatch.setattr(type(method), "delta", lambda self: pytest.fail("the activation path built ΔW"))
    model(torch.randn(2, 16)).sum().backward()
    assert method.mora_M.grad is not None


def test_unknown_operator_is_refused():
    with pytest.raises(ValueError, match=r"operator='rope'.*'sharing', 'rotation', 'truncation'"):
        vp.attach(Wrap(nn.Linear(4, 4)), "mora", targets=["layer"], operator="rope")


def test_summary_counts_the_square():
    _, model, method = attached(23, 29, rank=2, operator="sharing")
    assert "100" in vp.summary(model).split("trainable params:")[1].split("||")[0] and method.size == 10


def test_command_line_lists_mora_nola_and_alpha_lora_with_their_options(capsys):
    from visionpeft.cli import _methods

    _methods(None)
    lines = capsys.readouterr().out.splitlines()
    expected = {"mora": ["rank", "operator"], "nola": ["rank", "num_basis", "seed", "alpha"],
                "alpha-lora": ["rank", "alpha", "dropout", "rslora", "scale_bias", "alpha_every", "alpha_lr"]}
    for name, options in expected.items():
        start = lines.index(name) + 1
        assert [line.split()[0] for line in lines[start:start + len(options)]] == options, name
