"""The distribution's shape: three top-level packages of one distribution, layered one way."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["storage", "pipelines", "actors"])
def test_generic_top_level_names_belong_to_forgetless(package):
    # editable installs list a name once per way it is found: what matters is no other owner
    assert set(importlib.metadata.packages_distributions()[package]) == {"forgetless"}


def test_console_script_is_installed():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["forgetless"].value == "actors.cli:entry"


def test_layers_and_forbidden_imports_hold():
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


def test_constraints_pin_the_cpu_torch_build_on_disk():
    lines = (REPO / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines
