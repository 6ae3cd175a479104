"""Few-shot CLIP classification end to end on a tiny open_clip model and generated CoOp-format data."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import visionpeft as vp
from visionpeft.fewshot import ClipClassifier, CoOpSplit, clip_transform, evaluate, kshot_indices, train_few_shot

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}


def make_coop(root, per_class_train=12, per_class_test=10, seed=0):
    """Colored squares on noisy backgrounds, written as PNGs with a CoOp split JSON."""
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": [], "test": []}
    for part, count in (("train", per_class_train), ("test", per_class_test), ("val", 2)):
        for label, (name, rgb) in enumerate(COLORS.items()):
            for i in range(count):
                pixels = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                x, y = rng.integers(0, 16, 2)
                pixels[y:y + 16, x:x + 16] = rgb
                path = f"{name}/{part}_{i}.png"
                (root / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / path)
                split[part].append([path, label, name])
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json"


def tiny_clip():
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                           text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2))
    return model, SimpleTokenizer(context_length=16)


def test_coop_split_reads_and_validates(tmp_path):
    split_file = make_coop(tmp_path, 2, 1)
    data = CoOpSplit(split_file, tmp_path, "train", clip_transform(32))
    assert len(data) == 6 and data.classnames == ["red", "green", "blue"]
    image, label = data[0]
    assert image.shape == (3, 32, 32) and label == 0
    with pytest.raises(ValueError, match="no split 'trian'"):
        CoOpSplit(split_file, tmp_path, "trian")
    (tmp_path / "bad.json").write_text(json.dumps({"train": [["a.png", "zero", "red"]]}))
    with pytest.raises(ValueError, match=r"train\[0\]"):
        CoOpSplit(tmp_path / "bad.json", tmp_path, "train")
    with pytest.raises(FileNotFoundError):
        CoOpSplit(tmp_path / "missing.json", tmp_path, "train")


def test_kshot_sampling_is_seeded_and_balanced():
    labels = [0] * 10 + [1] * 10 + [2] * 3
    a, b = kshot_indices(labels, 4, seed=1), kshot_indices(labels, 4, seed=1)
    assert a == b and a != kshot_indices(labels, 4, seed=2)
    assert [sum(labels[i] == c for i in a) for c in range(3)] == [4, 4, 4]


def test_few_shot_svd_beats_its_own_zero_shot(tmp_path):
    split_file = make_coop(tmp_path)
    train = CoOpSplit(split_file, tmp_path, "train", clip_transform(32))
    test = CoOpSplit(split_file, tmp_path, "test", clip_transform(32))
    model, tokenize = tiny_clip()
    classifier = ClipClassifier(model, tokenize, train.classnames, ["a photo of a {} square.", "{}"])
    vp.attach(model, "svd")
    before = evaluate(classifier, test)
    result = train_few_shot(classifier, train, test, shots=8, steps=60, batch_size=12, lr=5e-3, progress=False)
    assert result["zero_shot_top1"] == before
    assert result["few_shot_top1"] > before + 20, result
    with pytest.raises(ValueError, match="template"):
        ClipClassifier(model, tokenize, ["a"], ["no slot"])
