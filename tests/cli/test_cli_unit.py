"""In-process checks of the parts that need no server: option parsing and the error boundary."""

from __future__ import annotations

import pytest

from orchestrator.cli import jobs as jobs_cli
from orchestrator.cli.gc import parse_age
from orchestrator.cli.main import main
from orchestrator.cli.output import CliError


def test_options_are_json_when_valid_else_text() -> None:
    parsed = jobs_cli.parse_options(
        ["n=2", "f=0.5", "flag=true", "items=[1, 2]", 'obj={"a": 1}', "s=hello", "e="]
    )
    assert parsed == {"n": 2, "f": 0.5, "flag": True, "items": [1, 2], "obj": {"a": 1}, "s": "hello", "e": ""}
    with pytest.raises(CliError):
        jobs_cli.parse_options(["novalue"])


def test_ages() -> None:
    assert parse_age("0") == 0
    assert parse_age("90") == 90
    assert parse_age("15m") == 900
    assert parse_age("2h") == 7200
    assert parse_age("7d") == 7 * 86400
    with pytest.raises(CliError):
        parse_age("soon")


def _boom(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("something nobody expected")


def test_unexpected_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(jobs_cli, "client", _boom)
    monkeypatch.delenv("ORCHESTRATOR_DEBUG", raising=False)
    assert main(["jobs"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "error: RuntimeError: something nobody expected (ORCHESTRATOR_DEBUG=1 shows the traceback)"
    ]


def test_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(jobs_cli, "client", _boom)
    monkeypatch.setenv("ORCHESTRATOR_DEBUG", "1")
    assert main(["jobs"]) == 1
    assert "Traceback" in capsys.readouterr().err
