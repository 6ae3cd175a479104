"""The offline main job: procedural scenes, the mini VTAB tasks, the shipped tiny backbones, the runner on them."""
import json
import math
from pathlib import Path

import pytest
import torch

from visionpeft.data import procedural, vtab_dataset
from visionpeft.data.mini_vtab import write_task
from visionpeft.models.tiny import CONFIGS, pretraining_record, tiny, weights_path

ROOT = Path(__file__).resolve().parents[1]


# --- procedural scenes ----------------------------------------------------------------------------
@pytest.mark.parametrize("task", [procedural.orientation_task, procedural.location_task, procedural.counting_task])
def test_tasks_are_deterministic_and_labels_in_range(task):
    images, labels = task(64, seed=3)
    again, same = task(64, seed=3)
    other, _ = task(64, seed=4)
    assert torch.equal(images, again) and torch.equal(labels, same) and not torch.equal(images, other)
    assert images.shape == (64, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    classes = {procedural.orientation_task: 8, procedural.location_task: 16, procedural.counting_task: 6}[task]
    assert labels.min() >= 0 and labels.max() < classes


def test_circle_covers_its_area_and_the_arrow_points_along_its_angle():
    size, radius = 64, 0.2
    centre = torch.tensor([0.5, 0.5])
    circle = procedural.shape_alpha(torch.tensor(0), centre, torch.tensor(radius), torch.tensor(0.0), size)
    assert circle.sum().item() / size**2 == pytest.approx(math.pi * radius**2, rel=0.03)
    for angle, axis, sign in ((0.0, 1, 1), (math.pi, 1, -1), (math.pi / 2, 0, 1)):
        arrow = procedural.shape_alpha(torch.tensor(-1), centre, torch.tensor(radius), torch.tensor(angle), size)
        covered = torch.nonzero(arrow > 0.5).float()[:, axis] + 0.5
        ahead, behind = covered.max() / size - 0.5, 0.5 - covered.min() / size
        assert (ahead > behind + 0.02) if sign > 0 else (behind > ahead + 0.02), (angle, ahead, behind)


def test_counting_labels_match_the_red_circles_painted():
    images, labels = procedural.counting_task(32, seed=0, size=64)
    red = (images[:, 0] > 0.8) & (images[:, 1] < 0.3) & (images[:, 2] < 0.3)
    from scipy import ndimage

    for image_red, label in zip(red, labels):
        blobs = ndimage.label(image_red.numpy())[1]
        assert blobs >= label.item() + 1  # every target is a separate red blob (red non-circles may add more)


def test_pretraining_labels_cover_every_family():
    images, labels = procedural.pretraining_batch(512, seed=0)
    assert images.shape == (512, 3, 32, 32)
    for family, classes in procedural.PRETRAINING_LABELS.items():
        assert set(labels[family].tolist()) == set(range(classes)), family


# --- mini VTAB tasks on disk ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_vtab")
    write_task(root, "digits")
    return root


def test_digits_task_is_in_vtab_format_and_kept(mini_root):
    train = vtab_dataset(mini_root, "digits", "train800val200")
    test = vtab_dataset(mini_root, "digits", "test")
    assert (len(train), len(test), train.num_classes) == (1000, 797, 10)
    assert len(vtab_dataset(mini_root, "digits", "train800")) == 800
    image, label = train[0]
    assert image.size == (32, 32) and 0 <= label < 10
    stamp = (mini_root / "digits" / "test.txt").stat().st_mtime_ns
    write_task(mini_root, "digits")
    assert (mini_root / "digits" / "test.txt").stat().st_mtime_ns == stamp  # same seed: kept, not rewritten
    assert not list(mini_root.glob(".digits.*"))  # no staging folder left behind


def test_bad_task_input_names_the_value(mini_root, tmp_path):
    with pytest.raises(ValueError, match="unknown mini VTAB task 'dgits'.*digits"):
        write_task(tmp_path, "dgits")
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        write_task(tmp_path, "digits", seed=-1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "task.json").write_text(json.dumps({"num_classes": "ten"}))
    with pytest.raises(ValueError, match="int num_classes"):
        vtab_dataset(tmp_path, "broken", "test")
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'nothing'.*task.json"):
        vtab_dataset(tmp_path, "nothing", "test")


# --- shipped tiny backbones -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_shipped_backbone_loads_offline_and_is_pretrained(name):
    path = weights_path(name)
    assert path.stat().st_size <= 10 * 2**20
    model = tiny(name, num_classes=7)
    random = tiny(name, num_classes=7, pretrained=False)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    trunk = {k: v for k, v in model.state_dict().items() if "head" not in k}
    assert any(not torch.equal(v, random.state_dict()[k]) for k, v in trunk.items())
    record = pretraining_record(name)
    for family, classes in procedural.PRETRAINING_LABELS.items():  # well above chance on held-out scenes
        assert record["held_out_accuracy"][family] > 2 * 100 / classes, (family, record["held_out_accuracy"])


def test_pretraining_is_deterministic(tmp_path):
    """Two runs of the pretraining script's loop give bit-identical weights (and the shipped file is not touched)."""
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("pretrain_tiny", ROOT / "examples" / "pretrain_tiny.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shipped = weights_path("vit").stat().st_mtime_ns
    runs = []
    for run in ("a", "b"):
        script.pretrain("vit", steps=2, batch_size=8, output=tmp_path / run, weights=tmp_path / f"{run}.safetensors")
        runs.append(load_file(str(tmp_path / f"{run}.safetensors")))
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert weights_path("vit").stat().st_mtime_ns == shipped


def test_tiny_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown tiny backbone 'resnet'; available: vit, convnet"):
        tiny("resnet")
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got -2"):
        tiny("vit", num_classes=-2)


# --- the runner on them, with PEFT's LoRA as a baseline ------------------------------------------
@pytest.mark.parametrize("method", ["flora", "peft-lora", "peft-dora"])
def test_mini_recipe_trains_the_tiny_backbone_and_reloads_exactly(mini_root, tmp_path, method):
    from visionpeft.training import evaluate_adapter, load_recipe, train

    recipe = load_recipe(ROOT / "recipes" / "mini_vtab" / f"{method}.yaml",
                         [f"data.root={mini_root}", "train.epochs=null", "train.steps=6", "train.batch_size=16",
                          "train.warmup_epochs=0", "train.eval_interval=6", f"output={tmp_path / method}"])
    summary = train(recipe, progress=False)
    assert summary["steps"] == 6 and summary["trainable_parameters"] > 1290  # more than the 10-way head
    assert evaluate_adapter(recipe, str(tmp_path / method / "adapter")) == summary["final_top1"]


@pytest.mark.parametrize("backbone", ["vit", "convnet"])
def test_the_peft_dora_recipe_is_peft_dora_on_the_layers_and_at_the_rank_of_our_dora(backbone):
    import visionpeft as vp
    from visionpeft.data.mini_vtab import backbone_overrides
    from visionpeft.training import load_recipe
    from visionpeft.training.runner import apply_adapter

    def adapted(method):
        recipe = load_recipe(ROOT / "recipes" / "mini_vtab" / f"{method}.yaml", backbone_overrides(method, backbone))
        return recipe, apply_adapter(tiny(backbone, pretrained=False, num_classes=10), recipe["adapter"])

    (theirs_recipe, theirs), (ours_recipe, ours) = adapted("peft-dora"), adapted("dora")
    assert theirs_recipe["train"]["lr"] == ours_recipe["train"]["lr"]
    magnitudes = {n.split(".lora_magnitude_vector")[0]: p for n, p in theirs.named_parameters()
                  if "lora_magnitude_vector" in n and p.requires_grad}
    ours_layers = {name: m for name, m in ours.named_modules() if hasattr(m, "vp_adapters")}
    depthwise = {name for name, m in ours_layers.items() if getattr(m, "groups", 1) > 1}  # PEFT cannot at rank 4
    assert set(magnitudes) == set(ours_layers) - depthwise and magnitudes
    rank = ours_recipe["adapter"]["options"]["rank"]
    assert all(m.lora_A["default"].weight.shape[0] == rank for name, m in theirs.named_modules() if name in magnitudes)
    assert vp.adapters(ours)["default"]["options"]["rank"] == rank


def test_peft_lora_options_are_validated(tmp_path):
    from visionpeft.training import load_recipe

    path = ROOT / "recipes" / "mini_vtab" / "peft-lora.yaml"
    with pytest.raises(ValueError, match="adapter.options.rank=0 must be >= 1"):
        load_recipe(path, ["adapter.options.rank=0"])
    with pytest.raises(ValueError, match="takes options rank, alpha, dropout, use_dora, got 'scale'"):
        load_recipe(path, ["adapter.options.scale=2"])
    with pytest.raises(ValueError, match="model.kwargs must be empty"):
        from visionpeft.training.runner import build_model

        build_model(load_recipe(path, ["model.kwargs={depth: 2}"]), 10)


def test_the_quickstart_trains_a_backbone_with_that_backbones_own_choices(monkeypatch, tmp_path):
    import argparse
    import importlib.util
    from pathlib import Path

    from visionpeft.data.mini_vtab import BACKBONE_LR, BACKBONE_TARGETS

    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    monkeypatch.setattr(quickstart, "train", lambda recipe: {})
    args = argparse.Namespace(backbone="convnet", data=str(tmp_path), task="digits", output=str(tmp_path), epochs=None)
    recipe, _ = quickstart.run("flora", args)
    assert recipe["model"]["name"] == "visionpeft/tiny_convnet"
    assert recipe["train"]["lr"] == BACKBONE_LR["convnet"]["flora"]
    assert recipe["adapter"]["targets"] == BACKBONE_TARGETS["convnet"]
    args.backbone = "vit"
    recipe, _ = quickstart.run("flora", args)
    assert recipe["adapter"]["targets"] is None and recipe["train"]["lr"] != BACKBONE_LR["convnet"]["flora"]
