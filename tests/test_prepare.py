"""Dataset prepare scripts on tiny fake archives."""
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpeft.data import fgvc_dataset, vtab_dataset
from visionpeft.data.prepare import prepare_fgvc, prepare_vtab

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def fake_vtab_zip(path, broken=False):
    with zipfile.ZipFile(path, "w") as zf:
        for task in ("cifar100", "dtd"):  # cifar under NOAH's folder name
            for split in ("train800", "val200", "train800val200", "test"):
                lines = []
                for i in range(3):
                    name = f"images/{split}/{i:06d}.png"
                    if not (broken and task == "dtd" and split == "test" and i == 2):
                        zf.writestr(f"vtab-1k/{task}/{name}", png_bytes(i * 50))
                    lines.append(f"{name} {i}")
                zf.writestr(f"vtab-1k/{task}/{split}.txt", "\n".join(lines) + "\n")
    return path


def test_prepare_vtab_renames_and_checks(tmp_path):
    sizes = prepare_vtab(fake_vtab_zip(tmp_path / "vtab.zip"), tmp_path / "data" / "vtab-1k")
    assert set(sizes) == {"cifar", "dtd"} and sizes["dtd"]["test"] == 3
    assert (tmp_path / "data" / "vtab-1k" / "cifar").is_dir()
    assert vtab_dataset(tmp_path / "data" / "vtab-1k", "cifar", "test").labels == [0, 1, 2]


def test_prepare_vtab_refuses_missing_images_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test.txt:3: image 'images/test/000002.png' does not exist"):
        prepare_vtab(fake_vtab_zip(tmp_path / "vtab.zip", broken=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["vtab.zip"]


def test_prepare_fgvc_from_tgz_and_split_folder(tmp_path):
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        for i in range(4):
            data = png_bytes(i * 30)
            info = tarfile.TarInfo(f"CUB_200_2011/images/00{i % 2}.Bird/{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.json").write_text(json.dumps({f"00{i % 2}.Bird/{i}.png": i % 2 + 1 for i in range(3)}))
    (splits / "val.json").write_text(json.dumps({"000.Bird/0.png": 1}))
    (splits / "test.json").write_text(json.dumps({"001.Bird/3.png": 2}))
    done = subprocess.run([sys.executable, str(ROOT / "datasets" / "fgvc" / "prepare.py"), "cub", "--images", str(archive),
                           "--splits", str(splits), "--out", str(tmp_path / "fgvc")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train 3" in done.stdout
    data = fgvc_dataset(tmp_path / "fgvc", "cub", "test")
    assert data.labels == [1] and data[0][0].size == (6, 6)
    (splits / "test.json").write_text(json.dumps({"001.Bird/9.png": 2}))
    with pytest.raises(FileNotFoundError, match="test.json lists 1 image"):
        prepare_fgvc("cub", archive, splits, tmp_path / "fgvc2")
