"""α-LoRA's bi-level update in the runner: α leaves the adapter's optimizer and moves only on its own steps, every
``alpha_every`` steps on held-out batches."""
import csv

import pytest
import torch

import visionpeft as vp
from visionpeft.data.writers import write_vtab_task
from visionpeft.methods.alpha_lora import alpha_parameters
from visionpeft.training import runner
from visionpeft.training.recipe import validate
from conftest import squares, tiny_vit_recipe


def raw_recipe(root, output, holdout=0.25, **options):
    return tiny_vit_recipe(root, output, method="alpha-lora", options={"rank": 2, **options},
                           data={"alpha_holdout": holdout}, steps=7, batch_size=8, eval_interval=7, device="cpu",
                           checkpoint_interval=None)


def test_alpha_moves_only_on_its_own_steps(tmp_path, monkeypatch):
    write_vtab_task(tmp_path / "data", "dsprites_loc", {"train800val200": squares(32, 0), "test": squares(8, 1)})
    snapshots, models = [], []
    real_step = vp.step

    def watch(model, step, total):  # called after each adapter update, before that step's α update
        models.append(model)
        snapshots.append(torch.cat([p.detach().clone() for p in alpha_parameters(model).values()]))
        return real_step(model, step, total)

    monkeypatch.setattr(runner.vp, "step", watch)
    runner.train(validate(raw_recipe(tmp_path / "data", tmp_path / "run", alpha_every=3)), progress=False)
    final = torch.cat([p.detach() for p in alpha_parameters(models[-1]).values()])
    after = snapshots[1:] + [final]
    moved = [not torch.equal(a, b) for a, b in zip(snapshots, after)]  # moved during step 1..7 (after its update)
    assert moved == [False, False, True, False, False, True, False]
    assert torch.equal(snapshots[0], torch.ones_like(snapshots[0]))  # the adapter's optimizer never moved α
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [bool(r["alpha_loss"]) for r in rows] == [False, False, True, False, False, True, False]


@pytest.mark.parametrize("change,needle", [
    (dict(holdout=1.5), "data.alpha_holdout=1.5 must be a fraction in (0, 1)"),
    (dict(alpha_every=0), "alpha_every"),
])
def test_bad_bi_level_keys_are_refused(tmp_path, change, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        validate(raw_recipe(tmp_path, tmp_path / "run", **change))


def test_alpha_holdout_needs_alpha_lora(tmp_path):
    raw = raw_recipe(tmp_path, tmp_path / "run")
    raw["adapter"] = {"method": "lora", "options": {}}
    with pytest.raises(ValueError, match="got method 'lora'"):
        validate(raw)
