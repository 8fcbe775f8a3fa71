"""The install paths a user follows: pyproject, requirements.txt (Docker), the Dockerfile, the Makefile."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_txt_matches_pyproject_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(_requirements()) == sorted(project["dependencies"])
    assert project["name"] == "parallel-ai-orchestrator"
    assert project["scripts"]["orchestrator"] == "orchestrator.cli.main:main"
    assert project["requires-python"] == ">=3.11"


def test_dockerfile_is_the_guides() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.splitlines()[1] == "FROM python:3.13-slim"
    assert "COPY requirements.txt ." in dockerfile and "RUN pip install -r requirements.txt" in dockerfile
    cmd = re.search(r"^CMD (.+)$", dockerfile, re.MULTILINE)
    assert cmd is not None
    assert cmd.group(1) == (
        '["uvicorn", "orchestrator.api.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]'
    )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: ", makefile, re.MULTILINE) and re.search(r"^run: ", makefile, re.MULTILINE)
