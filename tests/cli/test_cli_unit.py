"""In-process checks of the parts that need no server: option parsing and the error boundary."""

from __future__ import annotations

import pytest

from orchestrator.cli import common as common_cli
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
    monkeypatch.setattr(common_cli, "client", _boom)  # every command's one request
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
    monkeypatch.setattr(common_cli, "client", _boom)  # every command's one request
    monkeypatch.setenv("ORCHESTRATOR_DEBUG", "1")
    assert main(["jobs"]) == 1
    assert "Traceback" in capsys.readouterr().err


def _snapshot(taken: float, status: str, workers: list[dict[str, object]], **root: object) -> object:
    from datetime import UTC, datetime, timedelta

    from orchestrator.cli.live import Snapshot

    created = datetime(2026, 1, 1, tzinfo=UTC)
    stamps = {k: (created + timedelta(seconds=float(v))).isoformat() for k, v in root.items()}  # type: ignore[arg-type]
    job = {"id": "j_000000000001", "status": status, "depth": 0, "worker_count": 2, **stamps}
    job["created_at"] = created.isoformat()
    return Snapshot(
        root=job,
        jobs={job["id"]: job},
        children={},
        workers={job["id"]: workers},
        taken_at=created + timedelta(seconds=taken),
        taken_mono=1000.0 + taken,
    )


def test_submit_wait_plain_output_stamps_statuses_and_worker_endings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The piped `--wait` view, fed the reads a real watcher made: a job read PENDING while its
    worker already runs is shown RUNNING; stamps come from one monotonic clock (they went
    0.2 s then 0.1 s when the job's start stamp replaced its creation); the end says how the
    workers ended, not a bare "2/2"."""
    from orchestrator.cli.live import _watch_plain

    running = {
        "id": "w_1",
        "status": "RUNNING",
        "worker_index": 0,
        "started_at": "2026-01-01T00:00:00.1+00:00",
    }
    reads = [
        _snapshot(0.2, "PENDING", []),
        _snapshot(0.26, "PENDING", [running, {"id": "w_2", "status": "IDLE", "worker_index": 1}]),
        _snapshot(0.3, "RUNNING", [running], started_at=0.15),
        _snapshot(
            0.4,
            "CANCELED",
            [
                {"id": "w_1", "status": "COMPLETED", "worker_index": 0},
                {"id": "w_2", "status": "TERMINATED", "worker_index": 1},
            ],
            started_at=0.15,
            finished_at=0.35,
        ),
    ]
    first, rest = reads[0], iter(reads[1:])

    class Fetcher:
        def snapshot(self) -> object:
            return next(rest)

    _watch_plain(Fetcher(), first, lambda: None, None)  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    changes = [line.split() for line in lines if "j_000000000001 d0" in line and "workers" not in line]
    assert [c[3] for c in changes] == ["PENDING", "RUNNING", "CANCELED"], lines
    stamps = [float(c[0].rstrip("s")) for c in changes]
    assert stamps == [0.2, 0.3, 0.4], lines  # RUNNING from the read that saw the started worker
    assert any("workers 2/2 ended: 1 COMPLETED, 1 TERMINATED" in line for line in lines), lines
    assert any("1 job(s): 1 CANCELED" in line for line in lines), lines


def test_a_job_read_pending_is_shown_running_only_once_a_worker_started() -> None:
    from orchestrator.cli.live import shown_status

    job = {"status": "PENDING"}
    assert shown_status(job, []) == "PENDING"
    assert shown_status(job, [{"status": "IDLE"}]) == "PENDING"
    assert shown_status(job, [{"status": "IDLE"}, {"status": "PAUSED"}]) == "RUNNING"
    assert (
        shown_status(job, [{"status": "COMPLETED", "started_at": "2026-01-01T00:00:00+00:00"}]) == "RUNNING"
    )
    assert shown_status({"status": "CANCELED"}, [{"status": "RUNNING"}]) == "CANCELED"
