"""FSDP2 (``fully_shard``, DTensor parameters) on CPU over gloo with 2 processes, against one process on the same
global batch: the losses, the saved adapter, and a run resumed in new processes from an adapter saved mid-run.

Two spawns of 2 processes run every method: the first trains ``STEPS`` steps with ``vp.save`` on every rank after
step ``SAVED_AT`` and at the end (and a save whose gather fails); the second, in fresh processes, loads the step
``SAVED_AT`` adapter before sharding and trains the remaining steps. Plain SGD keeps no optimizer state, so the
adapter is the whole training state: SaRA's frozen entries and SNELLA's budgets (re-allocated at step 2) included.
In float64: SNELLA's allocation rounds per-layer shares of the budget down to whole entries, and float32 round-off
between one full batch and two averaged halves can move an entry across that boundary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visionpeft as vp

WORLD = 2
BATCH = 8
STEPS = 3
SAVED_AT = 2
METHODS = {
    "lora": dict(rank=2),
    # progressive re-selection at step 2 (>= 0.5 · 3): the frozen entries are saved state
    "sara": dict(density=0.05, progressive_at=0.5, path="weight"),
    # budgets re-allocated by importance at step 2 (a multiple of interval), none at step 3
    "snella": dict(rank=2, density=0.5, init_density=0.5, warmup=0.0, final=0.0, interval=2),
    "nola": dict(rank=2, num_basis=(8, 8), seed=3),
}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=4).double()


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (BATCH,), generator=g)


def train(model, first: int, last: int, rank: int = 0, world: int = 1, save_at: dict | None = None) -> list[float]:
    """Steps ``first``..``last`` on this rank's share of each global batch; the global mean loss per step.
    ``save_at``: {step: directory} to save into after that step."""
    optimizer = torch.optim.SGD(list(vp.trainable_parameters(model).values()), lr=0.5)
    losses = []
    share = BATCH // world
    for step in range(first, last + 1):
        x, y = batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(model(x), y) + vp.regularization(model)
        loss.backward()
        optimizer.step()
        vp.step(model, step, STEPS)
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        losses.append(value.item())
        if save_at and step in save_at:
            vp.save(model, save_at[step])
    return losses


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, init_file: str, out: str, phase: str) -> None:
    import visionpeft.io as vp_io
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out = Path(out)
    writes = []
    plain_write = vp_io.atomic_write
    vp_io.atomic_write = lambda path, write: writes.append(str(path)) or plain_write(path, write)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        report = {}
        for method, options in METHODS.items():
            model = tiny_vit()
            if phase == "straight":
                vp.attach(model, method, unfreeze=["head"], **options)
                shard(model, mesh)
                losses = train(model, 1, STEPS, rank, WORLD,
                               save_at={SAVED_AT: out / method / "saved", STEPS: out / method / "fsdp"})
                # every rank returned after rank 0's write: the pair is complete and checks out here
                vp_io.read_config(out / method / "fsdp")
                if method == "lora":
                    report["failed_gather"] = _save_with_failing_gather(model, out / method / "fsdp", DTensor)
            else:
                vp.load(model, out / method / "saved")  # before sharding, as without FSDP
                shard(model, mesh)
                losses = train(model, SAVED_AT + 1, STEPS, rank, WORLD, save_at={STEPS: out / method / "resumed"})
            report[method] = losses
        report["writes"] = writes
        (out / f"{phase}_rank{rank}.json").write_text(json.dumps(report))
    finally:
        vp_io.atomic_write = plain_write
        torch.distributed.destroy_process_group()


def _save_with_failing_gather(model, directory: Path, dtensor) -> dict:
    before = {name: (directory / name).read_bytes() for name in ("adapter.json", "adapter.safetensors")}
    plain = dtensor.full_tensor

    def broken(self, *args, **kwargs):
        raise RuntimeError("gather failed")

    dtensor.full_tensor = broken
    try:
        vp.save(model, directory)
        raised = False
    except RuntimeError as error:
        raised = "gather failed" in str(error)
    finally:
        dtensor.full_tensor = plain
    torch.distributed.barrier()
    after = {name: (directory / name).read_bytes() for name in before}
    return {"raised": raised, "unchanged": before == after}


def _spawn(tmp: Path, phase: str, tries: int = 2) -> None:
    """One phase in ``WORLD`` fresh processes. A process killed by a signal (gloo's TCP transport aborts the
    process when a peer's socket closes under a loaded machine) is retried once in new processes with a new
    rendezvous file; a Python exception in a worker, which is what a bug in the code under test raises, is not."""
    import torch.multiprocessing as mp

    for attempt in range(tries):
        init_file = tmp / f"init_{phase}_{attempt}"
        try:
            mp.spawn(_worker, args=(str(init_file), str(tmp / "out"), phase), nprocs=WORLD, join=True)
            return
        except mp.ProcessExitedException as error:
            if error.signal_name is None or attempt == tries - 1:
                raise


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    _spawn(tmp, "straight")
    _spawn(tmp, "resumed")
    out = tmp / "out"
    one = {}
    for method, options in METHODS.items():
        model = vp.attach(tiny_vit(), method, unfreeze=["head"], **options)
        one[method] = train(model, 1, STEPS, save_at={STEPS: out / method / "one"})
    reports = {(phase, rank): json.loads((out / f"{phase}_rank{rank}.json").read_text())
               for phase in ("straight", "resumed") for rank in range(WORLD)}
    return out, one, reports


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    x, y = _tensors(a), _tensors(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
        assert torch.allclose(x[key], y[key], rtol=1e-5, atol=1e-6), (key, (x[key] - y[key]).abs().max())
    assert json.loads((a / "adapter.json").read_text())["adapters"] == json.loads((b / "adapter.json").read_text())["adapters"]


@pytest.mark.parametrize("method", METHODS)
def test_losses_equal_one_process_on_the_same_global_batch(runs, method):
    _, one, reports = runs
    assert reports["straight", 0][method] == pytest.approx(one[method], rel=1e-5, abs=1e-6)
    assert reports["straight", 0][method] == reports["straight", 1][method]


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_equals_the_one_process_adapter(runs, method):
    out, _, _ = runs
    _assert_same_adapter(out / method / "fsdp", out / method / "one")
    config = json.loads((out / method / "fsdp" / "adapter.json").read_text())
    assert config["model_class"] == "VisionTransformer"
    if method == "snella":  # the re-allocated budgets are saved, not the initial ones
        budgets = [v.item() for k, v in _tensors(out / method / "fsdp").items() if k.endswith(".budget")]
        assert len(set(budgets)) > 1


@pytest.mark.parametrize("method", METHODS)
def test_a_run_resumed_in_new_processes_reaches_the_same_weights(runs, method):
    out, one, reports = runs
    _assert_same_adapter(out / method / "resumed", out / method / "fsdp")
    assert reports["resumed", 0][method] == pytest.approx(one[method][SAVED_AT:], rel=1e-5, abs=1e-6)


def test_only_rank_zero_writes_and_a_failed_gather_keeps_the_previous_adapter(runs):
    _, _, reports = runs
    assert reports["straight", 1]["writes"] == [] and reports["resumed", 1]["writes"] == []
    # two files per save: the step-2 and the final save of every method
    assert len(reports["straight", 0]["writes"]) == 2 * 2 * len(METHODS)
    for rank in range(WORLD):
        assert reports["straight", rank]["failed_gather"] == {"raised": True, "unchanged": True}
