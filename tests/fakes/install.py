"""Install the real agent CLIs for tests (tests/fakes/install_claude.sh); fail, never skip."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

INSTALL_SCRIPT = Path(__file__).resolve().parent / "install_claude.sh"
REPO = INSTALL_SCRIPT.parents[2]


def installed_cli(name: str) -> Path:
    """Path of the real `claude` or `codex` binary, installed from the npm registry if needed."""
    argv = ["bash", str(INSTALL_SCRIPT)] + (["--codex"] if name == "codex" else [])
    try:
        proc = subprocess.run(
            argv, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"could not run {' '.join(argv)} to install the {name} CLI: {exc!r}")
    if proc.returncode != 0:
        pytest.fail(
            f"the {name} CLI could not be installed (exit {proc.returncode}); these tests need it.\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    paths = [Path(line) for line in proc.stdout.split() if Path(line).name == name]
    if not paths or not os.access(paths[0], os.X_OK):
        pytest.fail(f"{' '.join(argv)} did not report an executable {name}: {proc.stdout!r}")
    return paths[0]
