"""Helpers for tests that run the real CLI (local Ray, DeepSpeed, MLflow) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "actors.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def toy_config_file(tmp_path, toy_stream_config):
    def write(**training) -> Path:
        config = {**toy_stream_config, "training": {**toy_stream_config["training"], **training}}
        path = tmp_path / "toy.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write
