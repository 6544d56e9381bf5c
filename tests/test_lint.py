"""The code stays lint-clean and formatted: ruff (pyproject.toml's [tool.ruff]) over the Python code and snakefmt
over the Snakefile and rules. `make format` applies both formatters; `make lint` runs these checks alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYTHON_CODE = ["src", "tests", "benchmarks", "workflow/scripts"]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "--no-cache", *PYTHON_CODE],
        ["ruff", "format", "--check", "--no-cache", *PYTHON_CODE],
        ["snakefmt", "--check", "Snakefile", "workflow"],
    ],
    ids=["ruff-check", "ruff-format", "snakefmt"],
)
def test_clean(command):
    proc = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(command)} (fix with `make format`):\n{proc.stdout}\n{proc.stderr}"
