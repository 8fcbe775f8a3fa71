"""README and docs/ARCHITECTURE.md say what the code does: routes, defaults, intervals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic.fields import FieldInfo

from orchestrator.api.main import create_app
from orchestrator.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
ARCHITECTURE = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
FIELDS: dict[str, FieldInfo] = Settings.model_fields


def _default(name: str) -> float:
    value = FIELDS[name.lower()].default
    assert isinstance(value, int | float) and not isinstance(value, bool), (name, value)
    return float(value)


def test_every_openapi_route_is_listed_in_the_readme() -> None:
    paths = create_app().openapi()["paths"]
    assert len(paths) > 10
    missing = []
    for path, operations in paths.items():
        shown = re.sub(r"\{[a-z_]*id\}", "{id}", path)
        for method in operations:
            if f"`{method.upper()} {shown}`" not in README:
                missing.append(f"{method.upper()} {shown}")
    assert not missing, f"routes the README's API section does not list: {missing}"


def _configuration_rows() -> list[tuple[list[str], list[str]]]:
    """(variables, defaults) of each row of the README's configuration table."""
    section = README[README.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 4 or not cells[1].strip().startswith("`"):
            continue
        rows.append((re.findall(r"`([^`]+)`", cells[1]), re.findall(r"`([^`]+)`", cells[2])))
    return rows


def test_documented_numeric_defaults_equal_the_settings() -> None:
    checked = 0
    for names, defaults in _configuration_rows():
        if len(names) != len(defaults):
            continue  # a default described in words ("generated once", "none")
        for name, default in zip(names, defaults, strict=True):
            if name.lower() in FIELDS and re.fullmatch(r"-?\d+(\.\d+)?", default):
                assert float(default) == _default(name), f"README: {name} defaults to {default}"
                checked += 1
    assert checked >= 10, f"only {checked} documented defaults found: is the table still parsed?"


def test_documented_variables_are_settings() -> None:
    """A variable the README documents is one the server reads (or the CLI's own)."""
    cli_only = {"ORCHESTRATOR_CLI_POLL_SECONDS", "ORCHESTRATOR_API_SOCKET"}
    for names, _defaults in _configuration_rows():
        for name in names:
            if re.fullmatch(r"[A-Z][A-Z0-9_]+", name) and name not in cli_only:
                assert name.lower() in FIELDS, f"README documents {name}, which no setting reads"


@pytest.mark.parametrize("name", ["README.md", "docs/ARCHITECTURE.md"])
def test_intervals_quoted_beside_a_setting_are_its_default(name: str) -> None:
    """ "`ORCHESTRATOR_POLL_SECONDS` (0.5 s)" while the default is 1 s is what a reader believes."""
    text = (ROOT / name).read_text()
    quoted = re.findall(r"`(ORCHESTRATOR_[A-Z_]+)`[^`(\n]{0,40}\((?:default )?(\d+(?:\.\d+)?) ?s\)", text)
    for variable, seconds in quoted:
        assert variable.lower() in FIELDS, f"{name} names {variable}, which no setting reads"
        assert float(seconds) == _default(variable), f"{name}: {variable} ({seconds} s)"
    if name == "docs/ARCHITECTURE.md":
        assert ("ORCHESTRATOR_POLL_SECONDS", "1") in quoted, "the engine's pass interval is no longer quoted"


def test_the_readme_says_how_to_run_the_guides_commands_and_choose_a_port() -> None:
    """A newcomer ran `python scripts/init_database.py` outside the virtualenv and got
    `No module named 'alembic'`; and did not know `make run` takes a port."""
    api = README[README.index("## API") :]
    api = api[: api.index("\n## ", 1)]
    assert "source .venv/bin/activate" in api and "`.venv/bin/`" in api
    assert "PORT=9000 make run" in README
    assert re.search(r"^PORT \?= 8000$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert re.search(r"--port \$\(PORT\)", (ROOT / "Makefile").read_text())
