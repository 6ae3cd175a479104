"""The few-shot CLIP recipe (``task: fewshot``) end to end: schema, ``visionpeft train`` and ``visionpeft eval`` on a tiny
open_clip model built from a config and colour-coded images written in CoOp's split JSON format."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from visionpeft.cli import main
from visionpeft.training import fewshot_recipe

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red_square": (220, 30, 30), "green_square": (30, 200, 40), "blue_square": (40, 50, 220)}
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def write_coop_dataset(root: Path, train_per_class=8, test_per_class=10, seed=0) -> Path:
    """A coloured square on a dark noisy background per class, as PNGs listed in a CoOp split JSON."""
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": [], "test": []}
    for part, count in (("train", train_per_class), ("val", 1), ("test", test_per_class)):
        for label, (name, rgb) in enumerate(COLORS.items()):
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                x, y = rng.integers(0, 16, 2)
                pixels[y:y + 16, x:x + 16] = rgb
                Image.fromarray(pixels).save(root / name / f"{part}_{i}.png")
                split[part].append([f"{name}/{part}_{i}.png", label, name])
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json"


def tiny_recipe(root: Path, split_file: Path, **sections) -> dict:
    recipe = {
        "task": "fewshot",
        "model": {"config": TINY_CLIP},
        "adapter": {"method": "svd"},
        "data": {"split_file": str(split_file), "image_root": str(root), "shots": 8, "augmentation": "none"},
        "train": {"steps": 60, "batch_size": 12, "lr": 5e-3, "eval_interval": 30, "device": "cpu"},
        "output": str(root / "run"),
    }
    for section, values in sections.items():
        recipe[section] = {**recipe[section], **values} if isinstance(values, dict) else values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def svd_run(tmp_path_factory):
    """One short K-shot svd run through ``visionpeft train``; shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("coop")
    split_file = write_coop_dataset(root)
    path = write_recipe(root / "svd.yaml", tiny_recipe(root, split_file))
    assert main(["train", str(path), "--quiet"]) == 0
    return path, root / "run"


# --- schema -------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"data": {"shots": 0}}, r"data\.shots=0 must be >= 1"),
    ({"data": {"augmentaton": "none"}}, r"unknown key\(s\) data\.augmentaton"),
    ({"data": {"templates": ["a photo"]}}, r"data\.templates .*'\{\}'"),
    ({"train": {"precision": "fp8"}}, r"'train\.precision' is 'fp8'; allowed: no, bf16, fp16"),
    ({"train": {"steps": 10, "epochs": 2}}, r"at most one of train\.steps and train\.epochs"),
    ({"train": {"lr": "fast"}}, r"'train\.lr' must be a number"),
    ({"adapter": {"method": "nope"}}, r"unknown method 'nope'; registered methods: .*svd"),
    ({"adapter": {"options": {"rank": 4}}}, r"adapter: svd: unknown option\(s\) 'rank'"),
    ({"model": {"name": "ViT-B-16"}}, r"exactly one of model\.name .* and model\.config"),
    ({"model": {"config": {"text_cfg": {"vocab_size": 64}}}}, r"vocab_size=64 must be >= 49408"),
    ({"model": {"library": "timm"}}, r"'model\.library' is 'timm'; allowed: open_clip, transformers"),
    ({"data": {"split_file": None}}, r"'data\.split_file' must be a string"),
])
def test_schema_errors_name_the_key_and_what_is_allowed(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        fewshot_recipe.validate(tiny_recipe(tmp_path, tmp_path / "split.json", **change))


def test_bad_recipe_fails_before_anything_runs(tmp_path, capsys):
    path = write_recipe(tmp_path / "bad.yaml", tiny_recipe(tmp_path, tmp_path / "split.json"))
    assert main(["train", str(path), "data.shots=0", "--quiet"]) == 2
    assert "data.shots=0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_defaults_follow_clip_svd_and_steps_follow_shots(tmp_path):
    recipe = fewshot_recipe.validate({"task": "fewshot", "model": {"name": "ViT-B-16"}, "adapter": {"method": "svd"},
                                      "data": {"split_file": "s.json", "image_root": "images"}, "output": "out"})
    assert recipe["data"]["templates"] == ["a photo of a {}."] and recipe["data"]["shots"] == 16
    assert (recipe["train"]["lr"], recipe["train"]["weight_decay"], recipe["train"]["batch_size"]) == (5e-4, 0.01, 32)
    assert fewshot_recipe.total_steps(recipe, classes=10) == 3200
    recipe["train"]["epochs"] = 2
    assert fewshot_recipe.total_steps(recipe, classes=10) == 2 * (160 // 32)


@pytest.mark.parametrize("method", ["svd", "lora"])
def test_shipped_fewshot_recipes_validate(method):
    recipe = fewshot_recipe.load_recipe(ROOT / "recipes" / "fewshot" / f"{method}.yaml")
    assert recipe["adapter"]["method"] == method and recipe["data"]["shots"] == 16
    assert recipe["model"]["name"].startswith("ViT-B-16") and recipe["train"]["batch_size"] == 32
    assert recipe["train"]["steps"] is None  # 200 x K


def test_split_labels_are_checked_before_the_model_is_built(tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": [["a.png", 0, "cat"], ["b.png", 2, "dog"]], "test": []}))
    with pytest.raises(ValueError, match=r"labels 0\.\.N-1 .* \[0, 2\]"):
        fewshot_recipe.read_splits(fewshot_recipe.validate(tiny_recipe(tmp_path, split_file)))


# --- the run ------------------------------------------------------------------------------------
def test_kshot_svd_run_improves_over_its_own_zero_shot(svd_run):
    _, run = svd_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["few_shot_top1"] > summary["zero_shot_top1"] + 20, summary
    assert summary["shots"] == 8 and summary["seed"] == 1 and summary["steps"] == 60 and summary["classes"] == 3
    assert 0 < summary["trainable_parameters"] < 2000 and summary["step_time_s"] > 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows] == [str(s) for s in range(61)]
    assert float(rows[0]["top1"]) == summary["zero_shot_top1"] and rows[0]["loss"] == ""
    assert [int(r["step"]) for r in rows if r["top1"]] == [0, 30, 60]
    assert float(rows[-1]["top1"]) == summary["few_shot_top1"]
    assert (run / "curves.png").stat().st_size > 0 and (run / "adapter" / "adapter.safetensors").is_file()
    assert not list(run.glob(".*"))  # no temporary file left behind


def test_saved_adapter_reloads_and_eval_gives_the_same_top1(svd_run, capsys):
    path, run = svd_run
    capsys.readouterr()
    assert main(["eval", str(path), "--adapter", str(run / "adapter")]) == 0
    top1 = float(re.search(r"top-1 ([\d.]+)%", capsys.readouterr().out).group(1))
    summary = json.loads((run / "summary.json").read_text())
    assert top1 == pytest.approx(summary["few_shot_top1"], abs=0.01)
    assert top1 > summary["zero_shot_top1"]


def write_tiny_transformers_clip(folder: Path) -> Path:
    """A tiny transformers CLIPModel saved with a CLIPTokenizer built from open_clip's copy of CLIP's BPE vocabulary."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    bpe = SimpleTokenizer()
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(bpe.encoder))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    start, end = tokenizer.convert_tokens_to_ids([tokenizer.bos_token, tokenizer.eos_token])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=start, eos_token_id=end,
                         pad_token_id=end),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_transformers_clip_trains_and_evaluates_the_same(tmp_path, capsys):
    split_file = write_coop_dataset(tmp_path, train_per_class=4, test_per_class=4)
    model_dir = write_tiny_transformers_clip(tmp_path / "clip")
    recipe = tiny_recipe(tmp_path, split_file, model={"library": "transformers", "name": str(model_dir), "config": None},
                         data={"shots": 4}, train={"steps": 40, "batch_size": 12, "eval_interval": None})
    path = write_recipe(tmp_path / "hf.yaml", recipe)
    assert main(["train", str(path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["few_shot_top1"] > summary["zero_shot_top1"] + 20, summary
    capsys.readouterr()
    assert main(["eval", str(path), "--adapter", str(tmp_path / "run" / "adapter")]) == 0
    top1 = float(re.search(r"top-1 ([\d.]+)%", capsys.readouterr().out).group(1))
    assert top1 == pytest.approx(summary["few_shot_top1"], abs=0.01)
