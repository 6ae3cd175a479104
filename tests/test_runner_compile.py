"""train.compile=true: torch.compile of the model in the runner, or a clear error where inductor cannot run."""
import csv

import numpy as np
import pytest

from conftest import tiny_vit_recipe
from visionpeft.data.writers import write_vtab_task
from visionpeft.training import backbone, runner
from visionpeft.training.recipe import validate


def raw_recipe(root, output, **train):
    return tiny_vit_recipe(root, output, **{"steps": 2, "batch_size": 8, "eval_interval": 2, "device": "cpu",
                                            "checkpoint_interval": None, **train})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("vtab")
    split = (list(rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)), [i % 4 for i in range(16)])
    write_vtab_task(folder, "dsprites_loc", {"train800val200": split, "test": split})
    return folder


def test_missing_inductor_is_a_clear_error_before_anything_is_written(root, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler on PATH
    with pytest.raises(ValueError, match="train.compile=true: inductor needs a C.. compiler on the CPU"):
        runner.train(validate(raw_recipe(root, tmp_path / "run", compile=True)), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(backbone.inductor_missing("cpu") is not None, reason="inductor cannot run on this CPU")
def test_a_compiled_run_matches_an_eager_one(root, tmp_path):
    def losses(name, **train):
        runner.train(validate(raw_recipe(root, tmp_path / name, **train)), progress=False)
        with open(tmp_path / name / "metrics.csv") as fh:
            return [float(r["loss"]) for r in csv.DictReader(fh)]

    assert losses("compiled", compile=True) == pytest.approx(losses("eager"), rel=1e-4, abs=1e-5)
    assert (tmp_path / "compiled" / "adapter" / "adapter.safetensors").is_file()  # saved from the eager module
