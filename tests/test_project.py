"""The project's promises outside the library: README commands, CI, command line."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert readme.index("```bash") < 40 and len(block) == 2
    assert "examples/quickstart.py" in block[0] and "pytest" in block[1]
    ci = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '(.*?)' README.md", ci).group(1)
    assert re.match(pattern.replace('\\.\\[', r'\.\[').replace('\\]"', r'\]"'), block[1])


def test_cli_lists_methods_and_options():
    out = subprocess.run([sys.executable, "-m", "visionpeft.cli", "methods"], capture_output=True, text=True, check=True).stdout
    assert {"lora", "flora"} <= set(out.split()) and "rank" in out and "spatial_rank" in out
