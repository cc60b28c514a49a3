"""What every benchmark script shares: a quiet environment and one way to report results."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def quiet_environment() -> None:
    """Set before torch/DeepSpeed/Ray are imported: no deprecation floods, CPU DeepSpeed, a local Ray behind a token."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # the benchmark's own Ray: on loopback only (Ray's single-machine mode), behind a token of its own
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def spread(values: list[float], digits: int | None = 2) -> dict[str, Any]:
    """The median and every trial, rounded to ``digits`` (None: whole numbers): what a bench reports."""
    import statistics

    return {"median": round(statistics.median(values), digits), "trials": [round(v, digits) for v in values]}


def report(results: dict[str, Any], path: Path | None) -> int:
    """Print the results as JSON, and write them to ``path`` when given. Returns the exit code."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return 0
