"""benchmarks/mini_vtab.py: resuming from finished runs, the learning-rate table, the targets' verdicts."""
import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mini_vtab_bench", ROOT / "benchmarks" / "mini_vtab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finished(output: Path, top1: float, trainable: int = 100) -> None:
    output.mkdir(parents=True)
    (output / "summary.json").write_text(json.dumps({"final_top1": top1, "trainable_parameters": trainable}))


def test_finished_runs_are_read_not_retrained(bench, tmp_path):
    _finished(tmp_path / "a", 71.5)
    _finished(tmp_path / "b", 12.0)
    # a job that had to train would fail: the recipe "no-such-method" does not exist
    jobs = {"a": ("no-such-method", "vit", [], tmp_path / "a"), "b": ("no-such-method", "vit", [], tmp_path / "b")}
    summaries = bench.run_jobs(jobs, workers=2, desc="test")
    assert {key: s["final_top1"] for key, s in summaries.items()} == {"a": 71.5, "b": 12.0}
    with pytest.raises(FileNotFoundError):
        bench.run_jobs({"c": ("no-such-method", "vit", [], tmp_path / "c")}, workers=1, desc="test")


def test_learning_rate_table_marks_each_methods_best_mean(bench, tmp_path, monkeypatch):
    import visionpeft.data.mini_vtab as mini_vtab

    monkeypatch.setattr(mini_vtab, "write_mini_vtab", lambda root, tasks: None)
    scores = {("digits", 3e-3): 80.0, ("digits", 1e-2): 90.0, ("digits", 3e-2): 95.0,
              ("counting", 3e-3): 70.0, ("counting", 1e-2): 75.0, ("counting", 3e-2): 60.0}
    for (task, lr), top1 in scores.items():
        _finished(tmp_path / "lr" / "vit" / task / "lora" / f"lr{lr:g}", top1)
    args = Namespace(backbones=["vit"], tasks=["digits", "counting"], methods=["lora", "peft-lora"], epochs=None,
                     data=str(tmp_path / "data"), runs=str(tmp_path), workers=1)
    table = bench.tune_lr(args)
    rows = [line for line in table.splitlines() if line.startswith("| lora")]
    assert len(rows) == 3 and "peft-lora" not in table  # PEFT's LoRA takes LoRA's rate
    assert rows[1] == "| lora | **0.01** | 90.0 | 75.0 | **82.5** |"  # 82.5 beats 75.0 and 77.5
    assert "**" not in rows[0] + rows[2]


def test_verdicts_name_what_misses(bench):
    tasks = ["digits", "counting"]
    args = Namespace(methods=["linear", "full", "peft-lora", "lora", "sara"], tasks=tasks)
    top1 = {("vit", t, m): values for t in tasks for m, values in {
        "linear": [50.0, 50.0], "full": [90.0, 90.0], "peft-lora": [88.0, 90.0], "lora": [89.5, 89.5],
        "sara": [45.0, 65.0]}.items()}
    met = bench.verdicts(args, top1, "vit")
    assert all(line.endswith("**met**") or "**met** (gap +0.5)" in line for line in met), met
    top1[("vit", "counting", "sara")] = [40.0, 50.0]
    top1[("vit", "digits", "lora")] = [80.0, 80.0]
    missed = bench.verdicts(args, top1, "vit")
    assert "**missed** (sara on counting)" in missed[0]
    assert "**missed** on digits (80.0 vs 89.0 ± 1.4, ours behind)" in missed[1]
    top1[("vit", "digits", "lora")] = [95.0, 95.0]  # ahead of the peer is no miss, and it is said
    ahead = bench.verdicts(args, top1, "vit")[1]
    assert "**met**; more than one std ahead on digits (95.0 vs 89.0 ± 1.4, ours ahead)" in ahead, ahead
    assert "(lora, 84.8)" in missed[2] and "**missed** (gap +5.2)" in missed[2]


def test_our_dora_is_judged_against_peft_doras_trained_runs(bench):
    args = Namespace(methods=["peft-dora", "dora"], tasks=["digits"])
    top1 = {("vit", "digits", "peft-dora"): [80.0, 82.0], ("vit", "digits", "dora"): [75.0, 75.0]}
    assert bench.verdicts(args, top1, "vit") == [
        "- our DoRA within one std of PEFT's DoRA, or ahead of it: **missed** on digits (75.0 vs 81.0 ± 1.4, ours behind)"]
    top1[("vit", "digits", "dora")] = [81.5, 80.5]
    assert bench.verdicts(args, top1, "vit")[0].endswith("**met**")


def test_learning_rate_choice_prefers_the_smaller_of_near_ties(bench):
    assert bench.chosen_lr({0.003: 73.0, 0.01: 75.2, 0.03: 75.5, 0.1: 17.2}) == 0.01
    assert bench.chosen_lr({0.01: 46.0, 0.1: 51.8, 0.3: 52.5, 1.0: 51.2}) == 0.1
    assert bench.chosen_lr({0.001: 58.8, 0.003: 69.2, 0.01: 52.2}) == 0.003


def test_a_run_from_an_older_recipe_is_not_reused(bench, tmp_path):
    overrides = ["data.task=digits", "train.seed=1", f"output={tmp_path}"]
    recipe = bench.recipe_for("lora", "vit", overrides)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert bench._same_recipe(tmp_path / "recipe.json", "lora", "vit", overrides)
    recipe["train"]["lr"] = recipe["train"]["lr"] * 3
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert not bench._same_recipe(tmp_path / "recipe.json", "lora", "vit", overrides)


def test_finished_only_reports_complete_backbones_and_trains_nothing(bench, tmp_path, monkeypatch):
    import visionpeft.data.mini_vtab as mini_vtab

    monkeypatch.setattr(mini_vtab, "write_mini_vtab", lambda root, tasks: None)
    _finished(tmp_path / "vit" / "digits" / "linear" / "seed0", 70.0, trainable=1290)
    args = Namespace(backbones=["vit", "convnet"], tasks=["digits"], methods=["linear"], seeds=[0], epochs=None,
                     data=str(tmp_path / "data"), runs=str(tmp_path), workers=1, finished_only=True)
    accuracy = bench.run_accuracy(args)
    assert args.backbones == ["vit"]
    assert accuracy == {"top1": {("vit", "digits", "linear"): [70.0]}, "trainable": {("vit", "linear"): 1290}}


def test_a_backbones_tuned_rate_replaces_the_recipes_and_overrides_still_win(bench, monkeypatch):
    import visionpeft.data.mini_vtab as mini_vtab

    monkeypatch.setattr(mini_vtab, "BACKBONE_LR", {"convnet": {"lora": 0.03}})
    recipe_lr = bench.recipe_for("lora", "vit")["train"]["lr"]
    assert bench.recipe_for("lora", "convnet")["train"]["lr"] == 0.03 != recipe_lr
    assert bench.recipe_for("peft-lora", "convnet")["train"]["lr"] == 0.03  # PEFT's LoRA takes LoRA's rate
    monkeypatch.setattr(mini_vtab, "BACKBONE_LR", {"convnet": {"dora": 0.003}})
    assert bench.recipe_for("peft-dora", "convnet")["train"]["lr"] == 0.003  # and PEFT's DoRA DoRA's
    assert bench.recipe_for("flora", "convnet")["train"]["lr"] == bench.recipe_for("flora", "vit")["train"]["lr"]
    assert bench.recipe_for("lora", "convnet", ["train.lr=0.5"])["train"]["lr"] == 0.5
    assert set(bench.LR_GRID) == set(bench.BACKBONES)
    for grid in bench.LR_GRID.values():
        assert set(grid) == set(bench.METHODS) - {"peft-lora", "peft-dora"}


def test_the_convnets_adapters_also_get_its_stem_and_the_baselines_are_untouched(bench):
    from visionpeft.models import tiny
    from visionpeft.targeting import resolve_targets

    model = tiny("convnet", pretrained=False)
    preset = {t.name for t in resolve_targets(model, None)}
    for method in ("lora", "peft-lora", "flora", "snella", "sara", "svd"):
        targets = bench.recipe_for(method, "convnet")["adapter"]["targets"]
        assert {t.name for t in resolve_targets(model, targets)} == preset | {"stem.0"}, method
        assert bench.recipe_for(method, "vit")["adapter"]["targets"] is None  # the ViT keeps its preset
    assert {"stages.1.downsample.1", "stages.1.blocks.0.conv_dw"} <= preset and "stem.0" not in preset
    for method in ("linear", "full"):
        assert bench.recipe_for(method, "convnet")["adapter"]["targets"] is None
    assert bench.recipe_for("lora", "convnet", ["adapter.targets=head"])["adapter"]["targets"] == "head"  # overrides win


def test_accuracy_per_parameter_plot_has_every_method(bench, tmp_path):
    import matplotlib.pyplot as plt

    methods = ["linear", "lora", "nola", "mora", "alpha-lora"]
    args = Namespace(backbones=["vit", "convnet"], tasks=["digits", "counting"], methods=methods)
    top1 = {(b, t, m): [50.0 + i, 52.0 + i] for b in args.backbones for t in args.tasks for i, m in enumerate(methods)}
    trainable = {(b, m): 10 ** (i + 2) for b in args.backbones for i, m in enumerate(methods)}
    drawn = []
    original = plt.Axes.annotate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Axes, "annotate", lambda ax, text, xy, **kw: drawn.append((text, xy)) or original(ax, text, xy, **kw))
        bench.plot_per_parameter(args, {"top1": top1, "trainable": trainable}, tmp_path / "grid_per_parameter.png")
    assert (tmp_path / "grid_per_parameter.png").stat().st_size > 0
    assert sorted(drawn)[:2] == [("alpha-lora", (10 ** 6, 55.0)), ("alpha-lora", (10 ** 6, 55.0))]
    assert sorted({text for text, _ in drawn}) == sorted(methods)
