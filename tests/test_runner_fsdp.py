"""The runner under FSDP options: without a distributed launch (one process), and on the CPU (where accelerate
ignores them and would train plain data-parallel), they are refused with a clear ValueError before anything is
written."""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from visionpeft.data.writers import write_vtab_task
from visionpeft.training import launch
from visionpeft.training.recipe import validate
from tests.test_runner_launch import raw_recipe, squares


@pytest.mark.parametrize("version", ["1", "2"])
def test_fsdp_options_with_one_process_are_refused_before_anything_is_written(tmp_path, monkeypatch, version):
    from visionpeft.training import train

    write_vtab_task(tmp_path / "data", "dsprites_loc", {"train800val200": squares(32, 0), "test": squares(16, 1)})
    for name in launch.WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    recipe = validate(raw_recipe(tmp_path / "data", tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"--use_fsdp .*FSDP_VERSION={version}.*started 1 process.*"
                                         r"--num_processes N with N >= 2"):
        train(recipe, progress=False)
    assert not (tmp_path / "run").exists()


def test_without_fsdp_options_one_process_is_accepted(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    launch.check_fsdp_launch("cpu")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    launch.check_fsdp_launch("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_accelerate_fsdp_on_the_cpu_is_refused_not_silently_data_parallel(tmp_path):
    write_vtab_task(tmp_path / "data", "dsprites_loc", {"train800val200": squares(32, 0), "test": squares(16, 1)})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw_recipe(tmp_path / "data", tmp_path / "run")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2",
           "--main_process_port", "29547", "-m", "visionpeft.cli", "train", str(path), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "accelerate runs FSDP only on GPUs and would train plain data-parallel here" in done.stderr
    assert not (tmp_path / "run").exists()
