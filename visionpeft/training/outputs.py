"""The files a run writes (summary, metrics, recipe, progress), each written atomically."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from visionpeft.io import atomic_write


def write_json(path: str | Path, payload: Any) -> Path:
    """``payload`` as indented JSON."""
    text = json.dumps(payload, indent=2)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(path: str | Path, rows: list[dict], fields: list[str]) -> Path:
    """``rows`` as a CSV file with the header ``fields``."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)
