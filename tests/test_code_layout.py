"""The code's shape holds without anyone policing it: imports follow the data's flow (no upward
import, no cycle) and ruff, configured in pyproject.toml, finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_imports_follow_the_flow():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "check_layers.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"ruff check (pyproject.toml's [tool.ruff]) found problems; "
                                  f"`.venv/bin/ruff check --fix .` fixes the simple ones:\n{done.stdout}{done.stderr}")
