"""``benchmarks/gpu.py --smoke``: every configuration of the GPU suite runs at tiny sizes on the CPU and the suite
writes its markdown table and JSON file (so CI keeps the suite working on machines without a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import visionpeft as vp
from visionpeft.methods.base import _ALIASES

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_configuration(tmp_path):
    pytest.importorskip("lycoris", reason="the suite's LyCORIS peer comes with the bench extra (lycoris-lora)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path / "gpu")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["smoke"] is True
    configs = {(row["workload"], row["config"]) for row in report["rows"]}
    assert {workload for workload, _ in configs} == {"smoke_vit", "smoke_unet", "smoke_clip", "smoke_flux"}
    ours = {name for name in vp.methods() if name not in _ALIASES}
    peers = {"peft-lora", "peft-dora", "lycoris-lora", "lycoris-lokr"}
    assert {config for workload, config in configs if workload == "smoke_vit"} == {"floor"} | peers | ours
    for row in report["rows"]:
        assert row["step_s"] > 0 and row["peak_mb"] > 0 and row["trainable"] > 0, row
    table = (tmp_path / "gpu.md").read_text()
    assert all(f"| {workload} | {config} |" in table for workload, config in configs)
    assert {(t["method"], t["workload"]) for t in report["targets"]} == {
        ("snella", "smoke_vit"), ("sara", "smoke_unet"), ("svd", "smoke_clip")}
