"""The recipe runner: schema, data formats, training per method, resume, multi-process, CLI."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from visionpeft.data import build_dataset, fgvc_dataset, vtab_dataset
from visionpeft.data.writers import write_fgvc_split, write_vtab_task
from visionpeft.training.recipe import apply_overrides, load_recipe, validate

ROOT = Path(__file__).resolve().parents[1]


def squares(n, seed, size=32, classes=4):
    """Colored squares whose position encodes the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % classes
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        y, x = divmod(label, 2)
        image[y * 16:(y + 1) * 16, x * 16:(x + 1) * 16] = (200, 180, 40)
        images.append(image)
        labels.append(label)
    return images, labels


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    train = squares(64, 0)
    for task in ("dsprites_loc", "cifar100"):  # cifar under the NOAH folder alias
        write_vtab_task(root, task, {"train800val200": train, "train800": train, "val200": squares(16, 2),
                                     "test": squares(32, 1)})
    return root


def recipe(vtab_root, tmp_path, method="lora", **train):
    raw = {
        "model": {"name": "vit_tiny_patch16_224", "image_size": 32,
                  "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        "adapter": {"method": method, "options": {}},
        "data": {"format": "vtab1k", "root": str(vtab_root), "task": "dsprites_loc", "train_split": "train800val200"},
        "train": {"steps": 16, "batch_size": 16, "lr": 5e-3, "warmup_epochs": 0, "min_lr": 1e-4, "eval_interval": 8,
                  "device": "cpu", "log_interval": 1, **train},
        "output": str(tmp_path / f"run_{method}"),
    }
    return raw


# --- schema ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,needle", [
    (lambda r: r.update(trian={}), "unknown section(s) trian"),
    (lambda r: r["train"].update(lrr=1), "train.lrr"),
    (lambda r: r["train"].update(lr="fast"), "'train.lr' must be a number"),
    (lambda r: r["train"].update(epochs=3), "exactly one of train.epochs and train.steps"),
    (lambda r: r["model"].pop("name"), "missing required key model.name"),
    (lambda r: r["data"].update(format="tfds"), "allowed: vtab1k, fgvc, imagefolder"),
    (lambda r: r["adapter"].update(options={"rnk": 2}), "unknown option(s) 'rnk'"),
    (lambda r: r["adapter"].update(method="nope"), "unknown method 'nope'"),
    (lambda r: r["train"].update(batch_size=0), "train.batch_size=0"),
    (lambda r: r["train"].update(grad_clip=-1.0), "train.grad_clip=-1.0 must be > 0"),
    (lambda r: r["model"].update(pretrained="yes"), "'model.pretrained' must be true/false"),
])
def test_schema_errors_name_the_key(tmp_path, change, needle):
    raw = recipe(tmp_path, tmp_path)
    change(raw)
    with pytest.raises(ValueError) as err:
        validate(raw)
    assert needle in str(err.value)


def test_overrides_and_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, tmp_path)))
    r = load_recipe(path, ["train.steps=3", "adapter.options.rank=4", "train.no_decay=[bias]"])
    assert r["train"]["steps"] == 3 and r["adapter"]["options"] == {"rank": 4} and r["train"]["no_decay"] == ["bias"]
    assert r["train"]["precision"] == "no" and r["model"]["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(ValueError, match="must look like section.key=value"):
        apply_overrides({}, ["train.steps"])


# --- data formats ---------------------------------------------------------------------------------
def test_vtab_lists_aliases_and_errors(vtab_root, tmp_path):
    data = vtab_dataset(vtab_root, "cifar", "test")  # found under the NOAH folder name cifar100
    assert len(data) == 32 and data.num_classes == 100 and data[0][0].size == (32, 32)
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'cifar10'"):
        vtab_dataset(vtab_root, "cifar10", "test")
    with pytest.raises(ValueError, match="split 'training'"):
        vtab_dataset(vtab_root, "dsprites_loc", "training")
    bad = tmp_path / "dtd"
    bad.mkdir()
    (bad / "test.txt").write_text("images/a.png 3\nimages/b.png\n")
    with pytest.raises(ValueError, match=r"test.txt:2: 'images/b.png' is not '<relative path> <int label>'"):
        vtab_dataset(tmp_path, "dtd", "test")
    with pytest.raises(FileNotFoundError, match="train800.txt' is missing"):
        vtab_dataset(tmp_path, "dtd", "train800")


def test_fgvc_json_and_imagefolder(tmp_path):
    from PIL import Image

    folder = tmp_path / "cub"
    (folder / "images" / "001.Bird").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / "images" / "001.Bird" / f"{i}.jpg")
    write_fgvc_split(folder, "train", [(f"001.Bird/{i}.jpg", 10 + i % 2) for i in range(4)])
    write_fgvc_split(folder, "test", [("001.Bird/0.jpg", 11)])
    data = fgvc_dataset(tmp_path, "cub", "train")
    assert data.num_classes == 2 and sorted(data.labels) == [0, 0, 1, 1]  # ids 10, 11 re-indexed
    assert fgvc_dataset(tmp_path, "cub", "test").labels == [1]
    (folder / "val.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="val.json' must be one JSON object"):
        fgvc_dataset(tmp_path, "cub", "val")
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "folder" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "folder" / split / name / "x.png")
    spec = {"format": "imagefolder", "root": str(tmp_path / "folder"), "task": None}
    assert build_dataset(spec, "test", None).labels == [0, 1]


# --- training ---------------------------------------------------------------------------------------
def losses(output):
    with open(Path(output) / "metrics.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


@pytest.mark.parametrize("method,options", [("lora", {"rank": 4}), ("flora", {"rank": 4}), ("svd", {}),
                                            ("full", {}), ("linear", {})])
def test_short_run_per_method_lowers_the_loss(vtab_root, tmp_path, method, options):
    from visionpeft.training import train

    raw = recipe(vtab_root, tmp_path, method)
    raw["adapter"]["options"] = options
    summary = train(validate(raw), progress=False)
    out = Path(raw["output"])
    assert (out / "summary.json").is_file() and (out / "curves.png").stat().st_size > 1000
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and summary["best_of_eval_top1"] >= summary["final_top1"] >= 0
    curve = losses(out)
    assert len(curve) == 16 and np.mean(curve[-4:]) < np.mean(curve[:4]), curve
    assert (out / "adapter").is_dir()


def test_resume_after_a_kill_ends_with_the_same_weights(vtab_root, tmp_path):
    from safetensors.torch import load_file

    def write(name, **train):
        raw = recipe(vtab_root, tmp_path, "lora", steps=40, checkpoint_interval=4, eval_interval=40, **train)
        raw["output"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path, Path(raw["output"])

    straight, straight_out = write("straight")
    subprocess.run([sys.executable, "-m", "visionpeft.cli", "train", str(straight), "--quiet"], check=True,
                   capture_output=True)
    killed, killed_out = write("killed")
    proc = subprocess.Popen([sys.executable, "-m", "visionpeft.cli", "train", str(killed), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed_out / "checkpoints" / "step_8").is_dir():
        assert time.time() < deadline and proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_out / "summary.json").exists(), "killed too late: the run had finished"
    subprocess.run([sys.executable, "-m", "visionpeft.cli", "train", str(killed), "train.resume=auto", "--quiet"],
                   check=True, capture_output=True)
    a = load_file(str(straight_out / "adapter" / "adapter.safetensors"))
    b = load_file(str(killed_out / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)
    assert losses(straight_out)[-5:] == pytest.approx(losses(killed_out)[-5:], abs=1e-5)


def test_two_processes_give_the_loss_of_one_on_the_same_global_batch(vtab_root, tmp_path):
    def run(name, processes):
        raw = recipe(vtab_root, tmp_path, "lora", steps=4, eval_interval=4)
        raw["output"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port=29533",
               "-m", "visionpeft.cli", "train", str(path), "--quiet"]
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
        return losses(raw["output"]), json.loads((Path(raw["output"]) / "summary.json").read_text())

    one, summary_one = run("one", 1)
    two, summary_two = run("two", 2)
    assert summary_two["processes"] == 2
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)


def test_cli_train_eval_sweep(vtab_root, tmp_path):
    raw = recipe(vtab_root, tmp_path, "lora", steps=4, eval_interval=4)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    cli = [sys.executable, "-m", "visionpeft.cli"]
    done = subprocess.run(cli + ["train", str(path), "adapter.options.rank=2", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    top1 = json.loads((Path(raw["output"]) / "summary.json").read_text())["final_top1"]
    evaluated = subprocess.run(cli + ["eval", str(path), "--adapter", str(Path(raw["output"]) / "adapter")],
                               capture_output=True, text=True)
    assert evaluated.returncode == 0 and f"top-1 {top1:.2f}%" in evaluated.stdout, evaluated.stderr
    bad = subprocess.run(cli + ["train", str(path), "train.lrr=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "train.lrr" in bad.stderr
    swept = subprocess.run(cli + ["sweep", str(path), f"output={tmp_path / 'sweep'}", "--tasks", "dsprites_loc",
                                  "cifar", "--quiet"], capture_output=True, text=True)
    assert swept.returncode == 0, swept.stderr
    assert "mean of group means" in swept.stdout and "2-task mean" in swept.stdout
    assert (tmp_path / "sweep" / "results.md").is_file()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_recipe_validates(path):
    task = yaml.safe_load(path.read_text()).get("task")
    if task == "fewshot":
        from visionpeft.training import fewshot_recipe

        assert fewshot_recipe.load_recipe(path)["model"]["name"].startswith("ViT-B-16")
        return
    if task == "dreambooth":
        from visionpeft.training import dreambooth

        # sd15 recipes are named by method, the others <pipeline>_<method>
        assert dreambooth.load_recipe(path)["adapter"]["method"] == path.stem.split("_")[-1]
        return
    recipe = load_recipe(path)
    if path.parent.name == "mini_vtab":
        assert recipe["model"]["name"] == "visionpeft/tiny_vit" and recipe["model"]["pretrained"]
    else:
        assert recipe["model"]["name"] == "vit_base_patch16_224.orig_in21k"  # not the augreg alias


@pytest.mark.parametrize("method", ["lora", "flora", "snella", "sara", "svd", "full", "linear"])
def test_vtab_recipe_runs_on_a_tiny_backbone(vtab_root, tmp_path, method):
    """Each shipped VTAB recipe, with the backbone and schedule shrunk, trains end to end and lowers the loss."""
    from visionpeft.training import train

    tiny = ["model.name=vit_tiny_patch16_224", "model.pretrained=false", "model.image_size=32",
            "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
            f"data.root={vtab_root}", "data.task=dsprites_loc", "data.num_workers=0", "train.epochs=null",
            "train.steps=12", "train.batch_size=16", "train.warmup_epochs=0", "train.eval_interval=12",
            "train.checkpoint_interval=null", "train.resume=null", "train.device=cpu", "train.lr=5e-3",
            f"output={tmp_path / method}"]
    if method == "snella":
        tiny.append("adapter.options.rank=4")
    summary = train(load_recipe(ROOT / "recipes" / "vtab1k" / f"{method}.yaml", tiny), progress=False)
    assert summary["steps"] == 12
    curve = losses(tmp_path / method)
    assert np.mean(curve[-3:]) < np.mean(curve[:3]), curve


def test_bf16_and_gradient_accumulation_run(vtab_root, tmp_path):
    from visionpeft.training import train

    raw = recipe(vtab_root, tmp_path, "lora", precision="bf16", grad_accum=2, steps=8, batch_size=8)
    raw["adapter"]["options"] = {"rank": 4}
    summary = train(validate(raw), progress=False)
    assert summary["steps"] == 8
    curve = losses(raw["output"])
    assert len(curve) == 8 and np.mean(curve[-3:]) < np.mean(curve[:3]), curve


def test_accumulating_two_half_batches_matches_one_full_batch(vtab_root, tmp_path):
    from safetensors.torch import load_file

    from visionpeft.training import train

    def run(name, **train_options):
        raw = recipe(vtab_root, tmp_path, "lora", steps=3, eval_interval=3, **train_options)
        raw["output"] = str(tmp_path / name)
        raw["adapter"]["options"] = {"rank": 4}
        train(validate(raw), progress=False)
        return load_file(str(tmp_path / name / "adapter" / "adapter.safetensors"))

    full = run("full", batch_size=16)
    halves = run("halves", batch_size=8, grad_accum=2)
    assert all(np.allclose(full[k].numpy(), halves[k].numpy(), atol=2e-5) for k in full)
