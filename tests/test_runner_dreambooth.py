"""DreamBooth resumes like the classification runner: checkpoints with a fingerprint, the same final weights after
a resume, a finished run reported, other settings refused."""
import numpy as np
import pytest
from PIL import Image

from visionpeft.models.pipelines import tiny_stable_diffusion
from visionpeft.training import dreambooth


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    tiny_stable_diffusion().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def recipe(pipeline_dir, instance_dir, output, **train):
    return dreambooth.validate({
        "task": "dreambooth", "model": {"pretrained": str(pipeline_dir)},
        "adapter": {"method": "lora", "options": {"rank": 2}},
        "data": {"instance_dir": str(instance_dir), "instance_prompt": "a photo of sks dog", "resolution": 32},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, **train},
        "output": str(output)})


def test_a_resumed_dreambooth_run_ends_with_the_weights_of_an_uninterrupted_one(pipeline_dir, instance_dir, tmp_path,
                                                                                capsys):
    from safetensors.torch import load_file

    dreambooth.train(recipe(pipeline_dir, instance_dir, tmp_path / "straight", checkpoint_interval=None), progress=False)
    out = tmp_path / "resumed"
    dreambooth.train(recipe(pipeline_dir, instance_dir, out, checkpoint_interval=3), progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3"]
    (out / "summary.json").unlink()  # as if stopped after step 3, inside an epoch
    with pytest.raises(ValueError, match="train.lr: 0.001 there, 0.002 now"):
        dreambooth.train(recipe(pipeline_dir, instance_dir, out, resume="auto", lr=2e-3), progress=False)
    capsys.readouterr()
    summary = dreambooth.train(recipe(pipeline_dir, instance_dir, out, resume="auto"), progress=False)
    assert "resumed from step 3" in capsys.readouterr().out and summary["steps"] == 4
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)
    again = dreambooth.train(recipe(pipeline_dir, instance_dir, out, resume="auto"), progress=False)
    assert "is finished (4 steps)" in capsys.readouterr().out and again["final_loss"] == summary["final_loss"]
