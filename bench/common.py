"""What every benchmark script shares: a quiet environment and one way to report results."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def quiet_environment() -> None:
    """Set before torch/DeepSpeed/Ray are imported: no deprecation floods, CPU DeepSpeed, local Ray."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def report(results: dict[str, Any], path: Path | None) -> int:
    """Print the results as JSON, and write them to ``path`` when given. Returns the exit code."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return 0
