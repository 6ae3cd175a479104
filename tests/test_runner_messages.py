"""What the runner says: YAML's spellings of no, one-line errors naming the bad value, a clear error for
training merged adapters, training-only throughput, silenced bars, and where the outputs went."""
import csv
import json

import pytest
import torch
import yaml

import visionpeft as vp
from visionpeft.cli import main
from visionpeft.data.writers import write_vtab_task
from visionpeft.training import recipe as recipe_module
from visionpeft.training import runner
from visionpeft.training.recipe import apply_overrides, validate
from conftest import squares, tiny_vit_recipe


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    write_vtab_task(root, "dsprites_loc", {"train800val200": squares(32, 0), "test": squares(16, 1)})
    return root


def raw_recipe(root, output, **train):
    return tiny_vit_recipe(root, output, **{"steps": 4, "batch_size": 8, "eval_interval": 2, "device": "cpu", **train})


@pytest.mark.parametrize("spelling", ["no", "No", "off", "false", "'no'"])
def test_yaml_spellings_of_no_are_accepted_for_precision(tmp_path, spelling):
    raw = apply_overrides(raw_recipe(tmp_path, tmp_path), [f"train.precision={spelling}"])
    assert validate(raw)["train"]["precision"] == "no"


def test_another_boolean_for_precision_says_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"'train.precision' is True; allowed: no, bf16, fp16, auto"):
        validate(apply_overrides(raw_recipe(tmp_path, tmp_path), ["train.precision=yes"]))


@pytest.mark.parametrize("override,needle", [
    ("model.name=vit_tnyi_patch16_224", "model.name='vit_tnyi_patch16_224' is not a timm model"),
    ("model.image_size=48", "model.image_size=48 does not fit model 'vit_tiny_patch16_224'"),
    ("data.root=/nonexistent/vtab", "data.root '/nonexistent/vtab' does not exist"),
])
def test_bad_model_size_or_root_is_one_line_naming_the_value(vtab_root, tmp_path, capsys, override, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw_recipe(vtab_root, tmp_path / "run")))
    assert main(["train", str(path), override, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_backward_after_merge_says_to_unmerge():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))
    for p in model.parameters():
        p.requires_grad_(False)
    vp.attach(model, "lora", targets=["0", "1"], rank=2)
    vp.merge(model)
    with torch.no_grad():
        model(torch.randn(3, 6))  # inference after a merge is fine
    loss = model(torch.randn(3, 6)).square().sum()
    with pytest.raises(RuntimeError, match=r"merged adapter\(s\) \['default'\].*call vp.unmerge\(model\) before training"):
        loss.backward()
    vp.unmerge(model)
    model(torch.randn(3, 6)).square().sum().backward()
    assert all(p.grad is not None for p in vp.trainable_parameters(model).values())


def test_images_per_s_counts_training_time_only(vtab_root, tmp_path, monkeypatch):
    """A fake clock that advances one second per reading, and an evaluation that takes 1000 seconds."""
    class Clock:
        now = 0.0

        def perf_counter(self):
            Clock.now += 1.0
            return Clock.now

    real_evaluate = runner.evaluate

    def slow_evaluate(*args):
        Clock.now += 1000.0
        return real_evaluate(*args)

    monkeypatch.setattr(runner, "time", Clock())
    monkeypatch.setattr(runner, "evaluate", slow_evaluate)
    runner.train(validate(raw_recipe(vtab_root, tmp_path / "run", checkpoint_interval=None)), progress=False)
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)]
    assert rates == [8.0] * 4


def test_tqdm_disable_silences_the_bars(vtab_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    runner.train(validate(raw_recipe(vtab_root, tmp_path / "run")), progress=True)
    err = capsys.readouterr().err
    assert "step/s" not in err and "lora:" not in err, err


def test_train_prints_where_its_outputs_went(vtab_root, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw_recipe(vtab_root, tmp_path / "run")))
    assert main(["train", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"outputs in {tmp_path / 'run'}"
    assert "fingerprint" not in out and json.loads(out[out.index("{"):out.rindex("}") + 1])["steps"] == 4


def test_the_schema_help_gives_the_unit_of_eval_interval():
    doc = " ".join(recipe_module.__doc__.split())
    assert "train.eval_interval`` counts epochs when ``train.epochs`` is set and steps when ``train.steps`` is set" in doc
