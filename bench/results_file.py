"""Where the benches put their figures: one JSON file per bench under ``bench/results/``."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: Path, result: dict) -> None:
    """Write ``result`` as indented JSON at ``path`` (folders made) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")
