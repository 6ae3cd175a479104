"""The public API contract: bad input, save/load safety, bookkeeping."""
import copy
import json
import pickle

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import max_rel, perturb


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=2, dilation=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.fc(h).mean(1))


@pytest.fixture
def net():
    return Net().eval()


X = torch.randn(2, 3, 8, 8)


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
        dict(model.__dict__.get("_vp_records", {})),
    )


def assert_same(model, snap):
    state, modules, grads, recs = snapshot(model)
    assert modules == snap[1] and grads == snap[2] and recs == snap[3]
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k]) for k in state)


def test_methods_lists_lora():
    assert "lora" in vp.methods()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(method="loraa"), "unknown method 'loraa'"),
    (dict(method="lora", rank=0), "rank=0"),
    (dict(method="lora", rank=2.5), "rank=2.5"),
    (dict(method="lora", ranks=4), "unknown option(s) 'ranks'"),
    (dict(method="lora", dropout=1.0), "dropout=1.0"),
    (dict(method="lora", alpha=-1), "alpha=-1"),
    (dict(method="lora", targets=["nope"]), "target 'nope' matches no adaptable layer"),
    (dict(method="lora", targets=r"blocks\.\d+"), "matches no adaptable layer"),
    (dict(method="lora", targets="("), "not a valid regular expression"),
    (dict(method="lora", targets=nn.GRU), "GRU"),
    (dict(method="lora", targets=[1, 2]), "is not valid"),
    (dict(method="lora", targets=None), "no default-target rule covers"),
    (dict(method="lora", targets=["fc"], unfreeze=["hed"]), "unfreeze entry 'hed'"),
    (dict(method="lora", targets=["fc"], name="my adapter"), "adapter name 'my adapter'"),
])
def test_bad_attach_is_a_clear_error_and_changes_nothing(net, kwargs, needle):
    snap = snapshot(net)
    method = kwargs.pop("method")
    kwargs.setdefault("targets", ["fc"])
    with pytest.raises(ValueError) as err:
        vp.attach(net, method, **kwargs)
    assert needle in str(err.value)
    assert_same(net, snap)


def test_unknown_option_lists_valid_ones(net):
    with pytest.raises(ValueError, match="valid options: alpha, dropout, rank, rslora"):
        vp.attach(net, "lora", targets=["fc"], rnk=3)


def test_same_name_twice_is_refused_other_name_stacks(net):
    vp.attach(net, "lora", targets=["fc"])
    snap = snapshot(net)
    with pytest.raises(ValueError, match="'default' is already attached"):
        vp.attach(net, "lora", targets=["conv"])
    assert_same(net, snap)
    vp.attach(net, "lora", targets=["fc", "conv"], name="second", rank=2)
    assert set(net.fc.vp_adapters) == {"default", "second"}
    perturb(net)
    y = net(X)
    vp.merge(net)
    assert max_rel(net(X), y) < 1e-5
    vp.unmerge(net)
    assert max_rel(net(X), y) < 1e-5


def test_host_state_dict_keys_unchanged_and_frozen(net):
    before = set(net.state_dict())
    vp.attach(net, "lora", targets=["conv", "attn", "fc"], unfreeze=["head"])
    after = set(net.state_dict())
    assert before <= after
    assert all(".vp_adapters." in k for k in after - before)
    trainable = vp.trainable_parameters(net)
    assert set(trainable) == {k for k in after - before} | {"head.weight", "head.bias"}
    assert all(not p.requires_grad for n, p in net.named_parameters() if n in before and not n.startswith("head."))
    net.load_state_dict({k: v for k, v in net.state_dict().items()})  # original checkpoint tools keep working


def test_summary_reads_well(net):
    vp.attach(net, "lora", targets=["conv", "attn", "fc"], unfreeze=["head"], rank=4)
    text = vp.summary(net)
    assert "lora" in text and "MultiheadAttention" in text and "Conv" in text and "Linear" in text
    assert "unfrozen: head" in text
    trainable = sum(p.numel() for p in vp.trainable_parameters(net).values())
    assert f"trainable params: {trainable:,}" in text
    assert "adapters=['default']" in repr(net.fc)


def test_regularization_and_step_are_noops_for_lora(net):
    vp.attach(net, "lora", targets=["fc"])
    assert vp.regularization(net).item() == 0.0
    vp.step(net, 3, 10)
    with pytest.raises(ValueError, match="step=11"):
        vp.step(net, 11, 10)


def test_save_writes_only_safetensors_and_json(net, tmp_path):
    vp.attach(net, "lora", targets=["fc", "attn"], unfreeze=["head"])
    vp.save(net, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.json", "adapter.safetensors"]
    config = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert config["adapters"][0]["method"] == "lora"
    assert config["adapters"][0]["layers"] == {"attn": ["in_proj", "out_proj"], "fc": ["weight"]}
    assert config["library_version"] == vp.__version__
    assert "head.weight" in config["tensors"]


def test_unfrozen_modules_round_trip(net, tmp_path):
    base = copy.deepcopy(net)
    vp.attach(net, "lora", targets=["fc"], unfreeze=["head"])
    perturb(net)
    with torch.no_grad():
        net.head.weight.mul_(3)
    vp.save(net, tmp_path)
    loaded = vp.load(base, tmp_path)
    assert torch.equal(loaded.head.weight, net.head.weight)
    assert loaded.head.weight.requires_grad
    assert torch.equal(loaded(X), net(X))


def test_save_without_adapter_is_an_error(net, tmp_path):
    with pytest.raises(ValueError, match="no visionpeft adapter"):
        vp.save(net, tmp_path)


def _saved(net, tmp_path):
    vp.attach(net, "lora", targets=["fc", "attn"])
    perturb(net)
    vp.save(net, tmp_path)
    return tmp_path


def test_load_missing_directory_or_file(net, tmp_path):
    snap = snapshot(net)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vp.load(net, tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="adapter.json"):
        vp.load(net, tmp_path)
    assert_same(net, snap)


def test_load_corrupt_files_leaves_model_untouched(net, tmp_path):
    directory = _saved(Net(), tmp_path / "a")
    snap = snapshot(net)
    tensors = directory / "adapter.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum differs"):
        vp.load(net, directory)
    (directory / "adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        vp.load(net, directory)
    (directory / "adapter.json").write_text(json.dumps({"format": "peft"}))
    with pytest.raises(ValueError, match="not a visionpeft adapter"):
        vp.load(net, directory)
    assert_same(net, snap)


class Other(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)


def test_load_onto_other_architecture_fails_cleanly(tmp_path):
    directory = _saved(Net(), tmp_path / "a")
    for target in (Other(8), Other(6)):
        snap = snapshot(target)
        with pytest.raises(ValueError, match="another architecture|does not fit"):
            vp.load(target, directory)
        assert_same(target, snap)
    wider = Net()
    wider.fc = nn.Linear(8, 9)
    wider.head = nn.Linear(9, 5)
    snap = snapshot(wider)
    with pytest.raises(ValueError, match=r"shape mismatch .*fc\.vp_adapters"):
        vp.load(wider, directory)
    assert_same(wider, snap)


def test_load_twice_is_refused(net, tmp_path):
    directory = _saved(Net(), tmp_path / "a")
    vp.load(net, directory)
    snap = snapshot(net)
    with pytest.raises(ValueError, match="already attached"):
        vp.load(net, directory)
    assert_same(net, snap)


def test_atomic_save_leaves_previous_adapter_when_interrupted(net, tmp_path, monkeypatch):
    directory = _saved(net, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    import visionpeft.io as vio

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vio, "save_file", boom)
    with pytest.raises(OSError):
        vp.save(net, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_saved_files_get_the_umasks_mode_and_a_rewrite_keeps_a_chosen_mode(net, tmp_path):
    import os
    import stat

    old_mask = os.umask(0o022)
    try:
        directory = _saved(net, tmp_path / "a")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
        assert modes and set(modes.values()) == {0o644}, modes  # not mkstemp's private 0600
        (directory / "adapter.json").chmod(0o640)
        vp.save(net, directory)
        assert stat.S_IMODE((directory / "adapter.json").stat().st_mode) == 0o640
    finally:
        os.umask(old_mask)


def test_detach_restores_original_model(net):
    original = copy.deepcopy(net)
    net.head.weight.requires_grad_(False)
    trainable_before = {n: p.requires_grad for n, p in net.named_parameters()}
    vp.attach(net, "lora", targets=["conv", "attn", "fc"], unfreeze=["head"])
    perturb(net)
    vp.merge(net)
    vp.detach(net, merge=False)
    assert [type(m) for m in net.modules()] == [type(m) for m in original.modules()]
    assert set(net.state_dict()) == set(original.state_dict())
    assert max_rel(net(X), original(X)) < 1e-6
    assert {n: p.requires_grad for n, p in net.named_parameters()} == trainable_before
    vp.attach(net, "lora", targets=["fc"])  # attachable again after detach


def test_adapted_model_deepcopies_and_pickles(net):
    vp.attach(net, "lora", targets=["conv", "attn", "fc"])
    perturb(net)
    y = net(X)
    assert torch.equal(copy.deepcopy(net)(X), y)
    assert torch.equal(pickle.loads(pickle.dumps(net))(X), y)


def test_merge_scale_is_a_strength(net):
    base_out = copy.deepcopy(net)(X)
    vp.attach(net, "lora", targets=["fc"])
    perturb(net)
    full = net(X)
    vp.merge(net, scale=0.0)
    assert max_rel(net(X), base_out) < 1e-6
    vp.unmerge(net)
    vp.merge(net, scale=2.0)
    assert max_rel(net(X) - base_out, 2 * (full - base_out)) < 1e-4
    with pytest.raises(ValueError, match="scale"):
        vp.merge(net, scale="big")
