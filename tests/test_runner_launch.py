"""Where a run executes: launched processes form one job (also without a GPU), a device that is not there is an
error, and precision defaults to the best for the device."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from visionpeft.data.writers import write_vtab_task
from visionpeft.training import launch
from visionpeft.training.recipe import validate
from conftest import squares, tiny_vit_recipe


def raw_recipe(root, output, **train):
    return tiny_vit_recipe(root, output, **{"steps": 2, "batch_size": 16, "eval_interval": 2, **train})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only launch")
def test_torchrun_with_device_auto_on_cpu_is_one_data_parallel_job(tmp_path):
    write_vtab_task(tmp_path / "data", "dsprites_loc", {"train800val200": squares(32, 0), "test": squares(16, 1)})
    raw = raw_recipe(tmp_path / "data", tmp_path / "run")  # train.device defaults to auto
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           "-m", "visionpeft.cli", "train", str(path), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert done.stdout.count("outputs in") == 1  # one job: the main process reports


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_an_error(tmp_path):
    from visionpeft.training import train

    with pytest.raises(ValueError, match="train.device='cuda' but no CUDA GPU is available"):
        train(validate(raw_recipe(tmp_path, tmp_path / "run", device="cuda")), progress=False)


def test_precision_auto_is_full_precision_on_the_cpu_and_fp16_there_warns_once(monkeypatch):
    monkeypatch.setattr(launch, "_warned", set())
    assert launch.resolve_precision("auto", "cpu") == "no"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert launch.resolve_precision("fp16", "cpu") == "fp16"
        assert launch.resolve_precision("fp16", "cpu") == "fp16"
    assert [str(w.message) for w in caught if "fp16" in str(w.message)] == [
        "train.precision='fp16' on the CPU is several times slower than full precision; "
        "train.precision=auto picks the best for the device"]


def test_dreambooth_recipes_default_to_the_best_precision_for_the_device():
    from visionpeft.training import dreambooth

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes" / "dreambooth").glob("*.yaml"))
    assert recipes and all(dreambooth.load_recipe(p)["train"]["precision"] == "auto" for p in recipes)
    raw = yaml.safe_load(recipes[0].read_text())
    raw["train"].pop("precision")
    assert dreambooth.validate(raw)["train"]["precision"] == "auto"
