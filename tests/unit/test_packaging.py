"""The install paths a user follows: pyproject, requirements.txt (Docker), the Dockerfile, the Makefile."""

from __future__ import annotations

import re
import subprocess
import sys
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


def test_every_makefile_variable_is_used() -> None:
    """A variable the Makefile sets and nothing reads misleads (TEST_PG_URL did: the suite reads
    TEST_PG_ADMIN_URL)."""
    makefile = (ROOT / "Makefile").read_text()
    assigned = re.findall(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?|:|\+)?=", makefile, re.MULTILINE)
    assert assigned, "no variables found: the pattern is wrong"
    for name in assigned:
        exported = re.search(rf"^export\s+{name}\b", makefile, re.MULTILINE)
        assert f"$({name})" in makefile or exported, f"Makefile sets {name} and nothing uses it"


def test_an_editable_install_prints_no_setuptools_warning(tmp_path: Path) -> None:
    """`make install` (pip install -e .) with the setuptools the build backend pins: no
    'Editable installation' warning about folders shadowing the package. Installed into a
    throw-away environment, so the suite's own is left alone."""
    target = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python")]
    install = subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--no-cache-dir", "-e", str(ROOT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    output = install.stdout + install.stderr
    assert install.returncode == 0, output
    assert "Editable installation" not in output and "Please be careful" not in output, output
    assert "BuildBackendWarning" not in output and "SetuptoolsDeprecationWarning" not in output, output
    # And what was installed imports this checkout's package.
    where = subprocess.run(
        [str(target / "bin" / "python"), "-c", "import orchestrator; print(orchestrator.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert where.stdout.strip() == str(ROOT / "orchestrator" / "__init__.py"), where.stderr
