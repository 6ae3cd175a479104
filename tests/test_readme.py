"""The documentation keeps working: the README's quick start runs as written, and the docs point only inside the
repository, at files that exist."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def quick_start_code() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Quick start\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def adapter_tensors(model) -> list[str]:
    return [name for name in model.state_dict() if ".vp_adapters." in name]


def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(quick_start_code(), "README.md quick start", "exec"), names)

    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter.json", "adapter.safetensors"}
    model, reloaded = names["model"], names["fresh_model"]
    assert not adapter_tensors(model) and adapter_tensors(reloaded)  # detached; re-attached by vp.load
    model.eval(), reloaded.eval()
    with torch.no_grad():
        x = names["inputs"][:16]
        torch.testing.assert_close(model(x), reloaded(x), rtol=1e-4, atol=1e-5)  # trained head and adapter came back


DOCS = ["README.md", "DESIGN.md", "recipes", "datasets", "benchmarks", "examples", "visionpeft", "tests"]
OUTSIDE = re.compile(r"\.\./" + "shared|" + r"\b[Ss]ession [0-9]|\b[Ii]ssue #?[0-9]+\b")


def doc_files():
    for entry in DOCS:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.suffix in {".md", ".py", ".yaml"} and file.name != "history.md" and "__pycache__" not in file.parts:
                yield file


def test_docs_point_only_inside_the_repository_and_name_no_work_items():
    hits = [f"{file.relative_to(ROOT)}:{n}: {line.strip()}"
            for file in doc_files() for n, line in enumerate(file.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)


def test_every_results_file_the_benchmarks_readme_names_exists():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    named = set(re.findall(r"(?<!benchmarks/)results/[\w.]+\.md", text))
    assert "results/history.md" in named
    assert not [name for name in sorted(named) if not (ROOT / "benchmarks" / name).is_file()]
