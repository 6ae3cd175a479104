"""The runner sharded with FSDP2 (``train.fsdp=true``) on the CPU over gloo, 2 processes, against one process on the
same global batch: LoRA stopped by Ctrl-C and resumed in new processes ends with the one-process adapter (torchrun);
SaRA (its values and indices) trains to the one-process adapter (accelerate launch). And what is refused, before
anything is written: ``train.fsdp`` with one process or a non-bool value, accelerate's ``--use_fsdp`` on the CPU
(pointing to ``train.fsdp=true``) and with one process, FSDP version 1, fp16, alpha-lora's held-out step.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from visionpeft.data.writers import write_vtab_task
from visionpeft.training import checkpoints, launch
from visionpeft.training.recipe import validate
from conftest import squares, tiny_vit_recipe

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
CLI = ["-m", "visionpeft.cli", "train"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571"]
# --multi_gpu: accelerate's multi-process launcher; without a GPU the processes join one CPU job over gloo
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29573"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def raw_recipe(root, output, method="lora", options=None, **train):
    return tiny_vit_recipe(root, output, depth=2, method=method, options=options,
                           **{"steps": 8, "batch_size": 16, "eval_interval": 8, "device": "cpu",
                              "checkpoint_interval": None, **train})


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    write_vtab_task(root, "dsprites_loc", {"train800val200": squares(32, 0), "test": squares(16, 1)})
    return root


def write(tmp_path, name, raw) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_process_adapter(raw) -> dict[str, torch.Tensor]:
    from visionpeft.training import train

    train(validate(raw), progress=False)
    return load_file(str(Path(raw["output"]) / "adapter" / "adapter.safetensors"))


def assert_same_adapter(directory: Path, reference: dict[str, torch.Tensor]) -> None:
    saved = load_file(str(directory / "adapter.safetensors"))
    assert saved.keys() == reference.keys()
    for key, value in reference.items():
        assert saved[key].dtype == value.dtype and saved[key].shape == value.shape, key
        assert torch.allclose(saved[key].float(), value.float(), rtol=1e-4, atol=1e-5), \
            (key, (saved[key].float() - value.float()).abs().max())


def test_a_sharded_run_stopped_by_ctrl_c_resumes_to_the_one_process_adapter(vtab_root, tmp_path):
    raw = raw_recipe(vtab_root, tmp_path / "sharded", checkpoint_interval=2)
    path = write(tmp_path, "lora", raw)
    proc = subprocess.Popen(TORCHRUN + CLI + [str(path), "train.fsdp=true", "--quiet"], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list((tmp_path / "sharded" / "checkpoints").glob("step_*")):
        assert time.time() < deadline and proc.poll() is None, "the run ended before Ctrl-C"
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGINT)  # one process asked: every process stops at the same step
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert not (tmp_path / "sharded" / "summary.json").exists(), "Ctrl-C came too late: the run had finished"
    stopped_at = max(int(p.name.split("_")[1]) for p in (tmp_path / "sharded" / "checkpoints").glob("step_*"))
    assert stopped_at < 8 and f"interrupted at step {stopped_at}" in stderr, stderr[-3000:]
    checkpoint = tmp_path / "sharded" / "checkpoints" / f"step_{stopped_at}"
    kept = load_file(str(checkpoint / "fsdp_model.safetensors"))  # gathered whole: the adapter and the head only
    assert kept and all(".vp_adapters." in k or k.startswith("head.") for k in kept), sorted(kept)[:5]
    assert kept["head.weight"].shape == (16, 32)  # whole, not a shard of 8 rows

    resumed = subprocess.run(TORCHRUN + CLI + [str(path), "train.fsdp=true", "train.resume=auto", "--quiet"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stdout
    summary = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    assert summary["fsdp"] is True and summary["processes"] == 2 and summary["steps"] == 8
    config = json.loads((tmp_path / "sharded" / "adapter" / "adapter.json").read_text())
    assert config["model_class"] == "VisionTransformer"
    assert_same_adapter(tmp_path / "sharded" / "adapter", one_process_adapter(raw | {"output": str(tmp_path / "one")}))


def test_sara_sharded_under_accelerate_launch_equals_one_process(vtab_root, tmp_path):
    raw = raw_recipe(vtab_root, tmp_path / "sharded", method="sara", options={"density": 0.05}, steps=3,
                     eval_interval=3)
    path = write(tmp_path, "sara", raw)
    done = subprocess.run(ACCELERATE + CLI + [str(path), "train.fsdp=true", "--quiet"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = one_process_adapter(raw | {"output": str(tmp_path / "one")})
    assert any(k.endswith(".indices") for k in reference) and any(k.endswith(".values") for k in reference)
    assert_same_adapter(tmp_path / "sharded" / "adapter", reference)


# --- refusals -------------------------------------------------------------------------------------
@pytest.fixture
def one_process(monkeypatch):
    for name in launch.WORLD_SIZE_VARIABLES + launch.FSDP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def two_processes(one_process):
    one_process.setenv("WORLD_SIZE", "2")
    return one_process


def test_train_fsdp_with_one_process_is_refused_before_anything_is_written(vtab_root, tmp_path, one_process):
    from visionpeft.training import train

    recipe = validate(raw_recipe(vtab_root, tmp_path / "run", fsdp=True))
    with pytest.raises(ValueError, match=r"train.fsdp=true needs a distributed launch of 2 or more processes, but "
                                         r"the launcher started 1 process: use torchrun --nproc_per_node N"):
        train(recipe, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["sharded", 1, None])
def test_train_fsdp_must_be_true_or_false(tmp_path, value):
    with pytest.raises(ValueError, match=rf"recipe key 'train.fsdp' must be true/false, got {value!r}"):
        validate(raw_recipe(tmp_path, tmp_path / "run", fsdp=value))


def test_train_fsdp_is_part_of_the_fingerprint(tmp_path):
    plain, sharded = (checkpoints.fingerprint(validate(raw_recipe(tmp_path, tmp_path / "run", fsdp=f)))
                      for f in (False, True))
    assert plain["recipe_sha256"] != sharded["recipe_sha256"]
    assert checkpoints.differences(plain, sharded) == ["train.fsdp: False there, True now"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_accelerate_fsdp_options_with_one_process_are_refused_before_anything_is_written(
        vtab_root, tmp_path, one_process, version):
    from visionpeft.training import train

    one_process.setenv("ACCELERATE_USE_FSDP", "true")
    one_process.setenv("FSDP_VERSION", version)
    recipe = validate(raw_recipe(vtab_root, tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"--use_fsdp .*FSDP_VERSION={version}.*started 1 process.*"
                                         r"--num_processes N with N >= 2"):
        train(recipe, progress=False)
    assert not (tmp_path / "run").exists()


def test_accelerate_fsdp_on_the_cpu_is_refused_pointing_to_train_fsdp(tmp_path, two_processes):
    two_processes.setenv("ACCELERATE_USE_FSDP", "true")
    two_processes.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match=r"accelerate runs FSDP only on GPUs and would train plain data-parallel "
                                         r"here: drop --use_fsdp and give train.fsdp=true"):
        launch.runner_shards(validate(raw_recipe(tmp_path, tmp_path / "run")))
    # a run that does not shard itself (DreamBooth, evaluation) keeps accelerate's refusal
    with pytest.raises(ValueError, match="accelerate runs FSDP only on GPUs"):
        launch.check_fsdp_launch("cpu")


def test_on_gpus_accelerate_fsdp2_takes_the_runners_path_and_fsdp1_is_refused(tmp_path, two_processes):
    two_processes.setattr(launch, "resolve_device", lambda device: "cuda")
    two_processes.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = validate(raw_recipe(tmp_path, tmp_path / "run", device="auto", precision="bf16"))
    two_processes.setenv("FSDP_VERSION", "2")
    assert launch.runner_shards(recipe) is True
    two_processes.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"FSDP_VERSION=1: visionpeft trains sharded with FSDP2 only .*give "
                                         r"--fsdp_version 2, or drop --use_fsdp and give train.fsdp=true"):
        launch.runner_shards(recipe)


def test_what_the_sharded_run_cannot_do_is_refused_naming_it(tmp_path, two_processes):
    two_processes.setattr(launch, "_warned", set())
    assert launch.runner_shards(validate(raw_recipe(tmp_path, tmp_path / "run", fsdp=True))) is True
    assert launch.runner_shards(validate(raw_recipe(tmp_path, tmp_path / "run"))) is False
    with pytest.warns(UserWarning, match="fp16"), pytest.raises(
            ValueError, match=r"train.fsdp=true with train.precision resolving to 'fp16'.*use train.precision=bf16"):
        launch.runner_shards(validate(raw_recipe(tmp_path, tmp_path / "run", fsdp=True, precision="fp16")))
    raw = raw_recipe(tmp_path, tmp_path / "run", method="alpha-lora", fsdp=True)
    raw["data"]["alpha_holdout"] = 0.25
    with pytest.raises(ValueError, match=r"train.fsdp=true with data.alpha_holdout=0.25: .*data.alpha_holdout=null"):
        launch.runner_shards(validate(raw))
