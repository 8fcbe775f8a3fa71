"""Which database errors mean "unavailable" (503 in the API, a quiet retry in the engine), that a
PostgreSQL server that is down surfaces as SQLAlchemy's OperationalError, not a bare OSError, and
the log's one line per outage. Real errors where they can be had here (SQLite's from real files, a
connection to a database that does not exist); the rest are met for real in
tests/integration/test_database_failures.py."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from orchestrator.core.config import Settings
from orchestrator.db.availability import (
    DISK_FULL,
    LOCK_TIMEOUT,
    MISSING,
    READ_ONLY,
    STATEMENT_TIMEOUT,
    UNREACHABLE,
    OutageLog,
    classify,
    database_unavailable,
)
from orchestrator.db.session import Database
from tests.support.servers import free_port


class _Orig(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate
        self.connect_failed = False


def _dbapi(sqlstate: str | None, *, invalidated: bool = False, connect_failed: bool = False) -> DBAPIError:
    orig = _Orig(sqlstate)
    orig.connect_failed = connect_failed  # what db/availability.py marks a failed connect with
    return DBAPIError("SELECT 1", None, orig, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (OperationalError("SELECT 1", None, _Orig(None)), True),
        (PoolTimeout("QueuePool limit reached"), True),
        (_dbapi(None, invalidated=True), True),  # the server dropped the connection mid-statement
        (_dbapi("57P01"), True),  # terminating connection due to administrator command
        (_dbapi("57P03"), True),  # the database system is starting up
        (_dbapi("08006"), True),  # connection failure
        (_dbapi("53300"), True),  # too many connections
        (_dbapi("3D000"), True),  # the database does not exist (dropped, renamed)
        (_dbapi("57014"), True),  # statement_timeout: a 503 that says so
        (_dbapi("55P03"), True),  # lock_timeout
        (_dbapi("53100"), True),  # disk full
        (_dbapi("40P01"), False),  # a deadlock: a conflict, not an outage
        (IntegrityError("INSERT", None, _Orig("23505")), False),
        (_dbapi("42601"), False),  # a syntax error is a bug, never a 503
        (ValueError("not a database error"), False),
        (FileNotFoundError("not a database error either"), False),
    ],
)
def test_what_counts_as_unavailable(error: BaseException, unavailable: bool) -> None:
    assert database_unavailable(error) is unavailable


def test_a_postgres_server_that_is_down_raises_operational_error() -> None:
    """A real connection attempt to a port nobody listens on."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"

    async def attempt() -> BaseException:
        database = Database(Settings(database_url=url))
        try:
            async with database.session() as session:
                await session.execute(text("SELECT 1"))
        except Exception as exc:
            return exc
        finally:
            await database.dispose()
        raise AssertionError("connected to a port nobody listens on")

    error = asyncio.run(attempt())
    assert isinstance(error, OperationalError), repr(error)
    assert isinstance(error.__cause__, OSError) or isinstance(error.orig.__cause__, OSError)
    assert database_unavailable(error)


@pytest.mark.parametrize(
    ("sqlstate", "failure"),
    [("3D000", MISSING), ("57014", STATEMENT_TIMEOUT), ("55P03", LOCK_TIMEOUT), ("53100", DISK_FULL)],
)
def test_each_failure_says_which(sqlstate: str, failure: object) -> None:
    assert classify(_dbapi(sqlstate)) is failure


def _error(url: str, statement: str) -> DBAPIError:
    engine = create_engine(url)
    try:
        with engine.begin() as conn, pytest.raises(DBAPIError) as caught:
            conn.execute(text(statement))
        return caught.value
    finally:
        engine.dispose()


def test_a_read_only_database_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    error = _error(f"sqlite:///file:{path}?mode=ro&uri=true", "INSERT INTO t VALUES (1)")
    assert classify(error) is READ_ONLY
    assert READ_ONLY.detail.startswith("database unavailable")


def test_a_bad_statement_is_not_an_outage(tmp_path: Path) -> None:
    # SQLite raises OperationalError for a missing table too: a bug, a 500, not a 503.
    error = _error(f"sqlite:///{tmp_path / 'x.db'}", "SELECT * FROM no_such_table")
    assert classify(error) is None and not database_unavailable(error)


def test_a_raw_sqlite_error_is_classified(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    sqlite3.connect(path).close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            conn.execute("CREATE TABLE t (x INTEGER)")
    finally:
        conn.close()
    assert classify(caught.value) is READ_ONLY
    assert classify(ValueError("not the database's")) is None


def test_one_line_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    outages = OutageLog()
    down = ConnectionRefusedError(111, "Connect call failed")
    with caplog.at_level(logging.WARNING, logger="orchestrator.database"):
        for _ in range(50):
            assert outages.report(down, "engine main loop") is UNREACHABLE
        outages.recovered()  # a commit right after a failure: not yet the end
        outages.connected()
        outages.connected()
        assert outages.report(down, "api") is UNREACHABLE
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("engine main loop: database unavailable") and "Connect call failed" in lines[0]
    assert lines[1].startswith("database reachable again after")
    assert lines[2].startswith("api: database unavailable")


def test_a_full_disk_ends_at_a_write_not_a_connection(caplog: pytest.LogCaptureFixture) -> None:
    outages = OutageLog(settle_seconds=0.0)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]  # what SQLite sets on SQLITE_FULL
    with caplog.at_level(logging.WARNING, logger="orchestrator.database"):
        assert outages.report(full, "engine") is DISK_FULL
        outages.connected()  # a new connection does not free disk space
        assert outages.kind == DISK_FULL.kind
        outages.recovered()
        assert outages.kind is None
    assert len(caplog.records) == 2
    assert DISK_FULL.retry_after >= UNREACHABLE.retry_after


def test_timeouts_are_logged_once_in_a_while(caplog: pytest.LogCaptureFixture) -> None:
    """A table locked for minutes: the engine retries every half second, the log says it once."""
    outages = OutageLog()
    with caplog.at_level(logging.WARNING, logger="orchestrator.database"):
        for _ in range(20):
            assert outages.report(_dbapi("55P03"), "engine main loop") is LOCK_TIMEOUT
        assert outages.report(_dbapi("57014"), "api") is STATEMENT_TIMEOUT
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("engine main loop: database busy: a lock was not granted")
    assert outages.kind is None  # a refusal is no outage


def test_kinds_flapping_within_one_outage_log_each_once(caplog: pytest.LogCaptureFixture) -> None:
    """A database renamed: refused (connections disallowed), dropped sessions, missing, ... in turn."""
    outages = OutageLog()
    down = ConnectionResetError(104, "Connection reset by peer")
    with caplog.at_level(logging.WARNING, logger="orchestrator.database"):
        for _ in range(5):
            for error in (_dbapi("55000", connect_failed=True), down, _dbapi("3D000"), down):
                outages.report(error, "engine")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert "refused the connection" in lines[0] and "does not exist" in lines[1]
