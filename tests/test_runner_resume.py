"""Runs a user can trust: no input makes training loop forever, a checkpoint resumes only the run it belongs to,
every recipe checkpoints, Ctrl-C stops with a checkpoint and one line, and a finished run is reported."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from visionpeft.data.writers import write_vtab_task
from visionpeft.training import train
from visionpeft.training.recipe import load_recipe, validate
from visionpeft.training.schedule import updates_per_epoch
from conftest import squares, tiny_vit_recipe

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "visionpeft.cli"]


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    for task in ("dsprites_loc", "clevr_count"):  # 16 and 8 classes
        write_vtab_task(root, task, {"train800val200": squares(48, 0), "test": squares(16, 1)})
    return root


def raw_recipe(vtab_root, output, **train):
    return tiny_vit_recipe(vtab_root, output, depth=2,
                           **{"steps": 8, "batch_size": 16, "eval_interval": 4, "device": "cpu", **train})


def write(tmp_path, name, raw):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- fewer images than a batch ----------------------------------------------------------------------
def test_a_batch_larger_than_the_data_is_refused_naming_both_numbers(vtab_root, tmp_path):
    path = write(tmp_path, "big", raw_recipe(vtab_root, tmp_path / "big", batch_size=100))
    done = subprocess.run(CLI + ["train", str(path), "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "train.batch_size=100" in done.stderr and "48 training images" in done.stderr
    assert not (tmp_path / "big").exists()  # refused before anything was written


def test_an_epoch_without_batches_is_an_error_not_a_loop():
    with pytest.raises(ValueError, match="0 batches"):
        updates_per_epoch(0, 1)
    assert updates_per_epoch(3, 4) == 1 and updates_per_epoch(8, 2) == 4


# --- fingerprints -----------------------------------------------------------------------------------
def test_checkpoints_record_what_they_were_trained_on(vtab_root, tmp_path):
    train(validate(raw_recipe(vtab_root, tmp_path / "run", checkpoint_interval=2, keep_checkpoints=None)),
          progress=False)
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["step_2", "step_4", "step_6"]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step_4" / "progress.json").read_text())["fingerprint"]
    assert {k: saved[k] for k in ("task", "model", "method", "options", "seed", "lr")} == {
        "task": "dsprites_loc", "model": "vit_tiny_patch16_224", "method": "lora", "options": {"rank": 2},
        "seed": 0, "lr": 5e-3}
    assert len(saved["recipe_sha256"]) == 64
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["fingerprint"] == saved


def test_resume_auto_refuses_a_run_of_other_settings_naming_the_keys(vtab_root, tmp_path, capsys):
    out = tmp_path / "run"
    train(validate(raw_recipe(vtab_root, out, checkpoint_interval=2)), progress=False)
    (out / "summary.json").unlink()  # as if killed after step 6
    before = sorted(p.name for p in out.rglob("*"))
    other = raw_recipe(vtab_root, out, checkpoint_interval=2, resume="auto", lr=1e-3)
    other["data"]["task"] = "clevr_count"  # another class count: refused, not a traceback
    with pytest.raises(ValueError) as err:
        train(validate(other), progress=False)
    message = str(err.value)
    assert "data.task: 'dsprites_loc' there, 'clevr_count' now" in message and "train.lr" in message
    assert "output=" in message and "train.resume=never" in message
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched
    capsys.readouterr()
    same = validate(raw_recipe(vtab_root, out, checkpoint_interval=2, resume="auto", log_interval=3))  # neutral key
    assert train(same, progress=False)["steps"] == 8
    assert "resumed from step 6" in capsys.readouterr().out


def test_resume_never_starts_fresh_and_drops_the_old_checkpoints(vtab_root, tmp_path):
    out = tmp_path / "run"
    train(validate(raw_recipe(vtab_root, out, checkpoint_interval=2)), progress=False)
    (out / "summary.json").unlink()
    other = raw_recipe(vtab_root, out, steps=3, checkpoint_interval=None, resume="never", lr=1e-3)
    assert train(validate(other), progress=False)["steps"] == 3
    assert not list((out / "checkpoints").iterdir())
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize("path", sorted(p for d in ("vtab1k", "fgvc", "mini_vtab") for p in (ROOT / "recipes" / d).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipes_write_to_a_folder_of_the_task_and_checkpoint(path):
    recipe = load_recipe(path, ["data.task=dtd"] if path.parent.name != "fgvc" else ["data.task=stanforddog"])
    assert Path(recipe["output"]).name == recipe["data"]["task"]
    assert recipe["train"]["checkpoint_interval"] == "eval"


# --- resuming what users run ------------------------------------------------------------------------
def test_messages_for_a_fresh_start_a_finished_run_and_a_restart(vtab_root, tmp_path, capsys):
    recipe = validate(raw_recipe(vtab_root, tmp_path / "run", resume="auto"))
    first = train(recipe, progress=False)
    assert "no checkpoint to resume, starting fresh" in capsys.readouterr().out
    metrics = (tmp_path / "run" / "metrics.csv").stat().st_mtime_ns
    again = train(recipe, progress=False)
    out = capsys.readouterr().out
    assert "is finished (8 steps)" in out and "train.resume=restart trains it again" in out
    assert again["final_top1"] == first["final_top1"] and (tmp_path / "run" / "metrics.csv").stat().st_mtime_ns == metrics
    restarted = train(validate(raw_recipe(vtab_root, tmp_path / "run", resume="restart")), progress=False)
    assert "is finished" not in capsys.readouterr().out and restarted["steps"] == 8
    assert (tmp_path / "run" / "metrics.csv").stat().st_mtime_ns != metrics


def test_ctrl_c_writes_a_checkpoint_and_one_line_then_resumes_to_the_same_weights(vtab_root, tmp_path):
    from safetensors.torch import load_file

    raw = raw_recipe(vtab_root, tmp_path / "straight", steps=60, checkpoint_interval=None, eval_interval=60)
    train(validate(raw), progress=False)
    raw["output"] = str(tmp_path / "stopped")
    raw["train"]["checkpoint_interval"] = 4  # to see that training is under way
    path = write(tmp_path, "stopped", raw)
    proc = subprocess.Popen(CLI + ["train", str(path), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while not list((tmp_path / "stopped" / "checkpoints").glob("step_*")):
        assert time.time() < deadline and proc.poll() is None, "the run ended before Ctrl-C"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "train.resume=auto" in last and "checkpoint" in last, stderr
    assert not (tmp_path / "stopped" / "summary.json").exists(), "Ctrl-C came too late: the run had finished"
    stopped_at = max(int(p.name.split("_")[1]) for p in (tmp_path / "stopped" / "checkpoints").glob("step_*"))
    assert f"interrupted at step {stopped_at}" in last
    resumed = subprocess.run(CLI + ["train", str(path), "train.resume=auto", "--quiet"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped_at}" in resumed.stdout
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)


def test_checkpoints_hold_the_trained_state_not_the_frozen_backbone(vtab_root, tmp_path):
    from safetensors.torch import load_file

    train(validate(raw_recipe(vtab_root, tmp_path / "run", checkpoint_interval=4)), progress=False)
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_4" / "model.safetensors"))
    assert saved and all(".vp_adapters." in k or k.startswith("head.") for k in saved), sorted(saved)[:5]
