"""Sweeps: reuse only a finished run of the same settings (and say so), overrides anywhere on the command line,
and the generated tasks of a root (those with a task.json)."""
import json

import pytest
import yaml

from visionpeft.cli import main
from visionpeft.data.writers import write_vtab_task
from conftest import squares, tiny_vit_recipe


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    official = tmp_path_factory.mktemp("vtab")
    write_vtab_task(official, "dsprites_loc", {"train800val200": squares(32, 0), "test": squares(16, 1)})
    generated = tmp_path_factory.mktemp("mini")
    for task in ("corners", "quadrants"):
        folder = write_vtab_task(generated, task, {"train800val200": squares(32, 0), "test": squares(16, 1)})
        (folder / "task.json").write_text(json.dumps({"num_classes": 4}))
    return official, generated


def recipe_file(tmp_path, root, task):
    raw = tiny_vit_recipe(root, tmp_path / "sweep" / "{task}", task=task, steps=3, batch_size=16, eval_interval=3,
                          device="cpu")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_options_after_tasks_are_overrides_not_task_names(roots, tmp_path, capsys):
    path = recipe_file(tmp_path, roots[0], "dsprites_loc")
    assert main(["sweep", str(path), "--tasks", "dsprites_loc", "train.steps=2", "--quiet", "train.lr=1e-2"]) == 0
    summary = json.loads((tmp_path / "sweep" / "dsprites_loc" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["fingerprint"]["lr"] == 1e-2
    assert (tmp_path / "sweep" / "results.md").is_file()  # above the task folders


def test_reuses_only_a_finished_run_of_the_same_settings(roots, tmp_path, capsys):
    path = recipe_file(tmp_path, roots[0], "dsprites_loc")
    assert main(["sweep", str(path), "--tasks", "dsprites_loc", "--quiet"]) == 0
    assert "reused" not in capsys.readouterr().out
    assert main(["sweep", str(path), "--tasks", "dsprites_loc", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dsprites_loc: reused the finished run" in out and "reused finished runs (same settings): dsprites_loc" in out
    assert main(["sweep", str(path), "--tasks", "dsprites_loc", "adapter.options.rank=4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "adapter.options.rank: 2 there, 4 now" in err and "train.resume=never" in err
    assert main(["sweep", str(path), "--tasks", "dsprites_loc", "adapter.options.rank=4", "train.resume=restart",
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "sweep" / "dsprites_loc" / "summary.json").read_text())["fingerprint"]["options"] == {"rank": 4}


def test_generated_tasks_with_a_task_json_are_swept(roots, tmp_path, capsys):
    path = recipe_file(tmp_path, roots[1], "corners")
    assert main(["sweep", str(path), "--quiet"]) == 0  # the root's generated tasks are the default
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| corners | generated |" in table and "| quadrants | generated |" in table and "2-task mean" in table
    assert main(["sweep", str(path), "--tasks", "nope", "--quiet"]) == 2
    assert "unknown vtab1k task(s) ['nope']" in capsys.readouterr().err
