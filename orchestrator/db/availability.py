"""Telling a database failure to wait out apart from every other database error.

A restarted, crashed, dropped, renamed, full or overloaded database is an outage, not a bug: the API
answers 503 with a sentence that says which (Retry-After: the client may retry) instead of 500, and
the engine's loops back off and retry quietly. Each process says so in one log line when the outage
starts and one when the database is reachable again (`OUTAGES`), not a line or a traceback per
attempt. A statement or lock timeout is a one-off refusal of the same kind (503, one line).
Nothing else is classified here: a constraint violation or a bad statement must still surface as
what it is.

SQLite reports the same kinds through its result codes: a full disk (SQLITE_FULL, ENOSPC) and a
file or directory it cannot write (read-only, cannot open, I/O error) are outages too; the unit
of work that met them rolled back, so nothing it acknowledged is lost, and nothing unacknowledged
was half-written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("orchestrator.database")

# A PostgreSQL connect that gets no answer (a frozen server, a dead network path) is an outage after
# this long: a 503 the client sees within its own timeout, not a request hung for asyncpg's 60 s.
CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Failure:
    """What a client is told about a database failure: `detail` (the 503's), how long to wait
    before retrying, and whether it is an outage (reported once until the database is back) or a
    one-off refusal (a timeout: reported each time)."""

    kind: str
    detail: str
    retry_after: int = 5
    outage: bool = True


UNREACHABLE = Failure(
    "unreachable", "database unavailable: it cannot be reached or is restarting; try again shortly"
)
MISSING = Failure(
    "missing",
    "database unavailable: the database does not exist on its server (dropped or renamed?); "
    "try again once it is back",
    retry_after=30,
)
REFUSED = Failure(
    "refused", "database unavailable: the server refused the connection; try again shortly", retry_after=30
)
NO_CONNECTIONS = Failure(
    "connections",
    "database unavailable: it accepts no more connections (max_connections reached); try again shortly",
)
POOL_BUSY = Failure(
    "pool", "database unavailable: every connection of this server's pool is in use; try again shortly"
)
DISK_FULL = Failure(
    "disk full",
    "database unavailable: its disk is full, so the change was not saved; try again once space is freed",
    retry_after=30,
)
READ_ONLY = Failure(
    "read-only",
    "database unavailable: it cannot be written (read-only, or its files cannot be opened or "
    "written), so the change was not saved; try again later",
    retry_after=30,
)
NO_TABLES = Failure(
    "no tables",
    "database unavailable: its tables are missing (dropped and created again empty?); restore it, "
    "or restart the server to create them",
    retry_after=30,
)
STATEMENT_TIMEOUT = Failure(
    "statement timeout",
    "database busy: a statement ran past the database's statement_timeout and was canceled; "
    "nothing was changed; try again",
    outage=False,
)
LOCK_TIMEOUT = Failure(
    "lock timeout",
    "database busy: a lock was not granted within the database's lock_timeout; nothing was "
    "changed; try again",
    outage=False,
)
SQLITE_BUSY = Failure(
    "busy",
    "database busy: another writer held it past the busy timeout; nothing was changed; try again",
    outage=False,
)

# PostgreSQL SQLSTATEs. Class 08 is a connection exception; these are the rest.
_BY_SQLSTATE: dict[str, Failure] = {
    "57P01": UNREACHABLE,  # admin_shutdown (pg_terminate_backend, a fast or immediate stop)
    "57P02": UNREACHABLE,  # crash_shutdown (another backend crashed: crash recovery)
    "57P03": UNREACHABLE,  # cannot_connect_now (starting up, shutting down, recovering)
    "57P05": UNREACHABLE,  # idle_session_timeout: the session was closed
    "25P03": UNREACHABLE,  # idle_in_transaction_session_timeout: the session was closed
    "3D000": MISSING,  # invalid_catalog_name: dropped, or renamed
    "57P04": MISSING,  # database_dropped
    "42P01": NO_TABLES,  # undefined_table: the database came back empty (the migrations are tested)
    "53300": NO_CONNECTIONS,  # too_many_connections (max_connections, or a role/database limit)
    "53100": DISK_FULL,  # disk_full
    "25006": READ_ONLY,  # read_only_sql_transaction: a standby, or default_transaction_read_only
    "58030": READ_ONLY,  # io_error
    "57014": STATEMENT_TIMEOUT,  # query_canceled (statement_timeout, or pg_cancel_backend)
    "55P03": LOCK_TIMEOUT,  # lock_not_available (lock_timeout, NOWAIT)
}

# SQLite primary result codes (the low byte of the extended code sqlite3 errors carry).
_BY_SQLITE_CODE: dict[int, Failure] = {
    5: SQLITE_BUSY,  # SQLITE_BUSY
    6: SQLITE_BUSY,  # SQLITE_LOCKED
    8: READ_ONLY,  # SQLITE_READONLY
    10: READ_ONLY,  # SQLITE_IOERR
    13: DISK_FULL,  # SQLITE_FULL
    14: READ_ONLY,  # SQLITE_CANTOPEN
}


def classify(exc: BaseException) -> Failure | None:
    """The failure `exc` means when it is the database's (down, gone, full, refusing, timing out),
    else None: an error to surface as what it is."""
    if isinstance(exc, PoolTimeout):
        return POOL_BUSY
    if isinstance(exc, DBAPIError):
        return _classify_dbapi(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):  # a raw sqlite3 error (the engine's SQLite watcher)
        return _BY_SQLITE_CODE.get(code & 0xFF)
    if isinstance(exc, ConnectionError) or type(exc).__module__.startswith("asyncpg"):
        # A raw asyncpg connection (the engine's LISTEN): refused, reset, or closed by the server.
        return _classify_asyncpg(exc)
    return None


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` is a database failure to wait out rather than a bug (see `classify`)."""
    return classify(exc) is not None


def _classify_dbapi(exc: DBAPIError) -> Failure | None:
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _BY_SQLITE_CODE.get(code & 0xFF)
    sqlstate = getattr(orig, "sqlstate", None)
    found = _by_sqlstate(sqlstate)
    if found is not None:
        return found
    if getattr(orig, "connect_failed", False):
        # The server's other refusals at connect (authentication, not accepting connections), or
        # no server at all (refused, unreachable, timed out).
        return REFUSED if sqlstate else UNREACHABLE
    if exc.connection_invalidated or isinstance(exc, OperationalError):
        return UNREACHABLE
    return None


class ConnectFailed(ConnectionError):
    """A connection made outside SQLAlchemy's pool (the engine's LISTEN) that could not be made:
    whatever the reason (down, no such database, authentication), the database is unavailable."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"cannot connect to the database: {cause}")
        self.sqlstate = getattr(cause, "sqlstate", None)


def _classify_asyncpg(exc: BaseException) -> Failure | None:
    import asyncpg

    found = _by_sqlstate(getattr(exc, "sqlstate", None))
    if found is not None:
        return found
    if isinstance(exc, ConnectFailed) and exc.sqlstate is not None:
        return REFUSED
    lost = (ConnectionError, OSError, asyncpg.PostgresConnectionError, asyncpg.ConnectionDoesNotExistError)
    if isinstance(exc, lost):
        return UNREACHABLE
    return None


def _by_sqlstate(sqlstate: object) -> Failure | None:
    if not isinstance(sqlstate, str):
        return None
    if sqlstate.startswith("08"):
        return UNREACHABLE
    return _BY_SQLSTATE.get(sqlstate)


_CONNECTION_KINDS = frozenset({UNREACHABLE.kind, MISSING.kind, REFUSED.kind, NO_CONNECTIONS.kind})


class OutageLog:
    """One log line when the database becomes unavailable to this process (and one more for each
    other specific kind met in the same outage: refusing, then missing), one when it is back; the
    attempts between say nothing, and so does a plain "unreachable" after a more specific line.

    A connection made ends an outage of connections at once. Any other ends at the first
    committed write unit of work `settle_seconds` after the last failure: during a full disk
    some units of work still commit (those that wrote nothing), which must not end it. One-off
    refusals (timeouts) are logged at most once per kind every `settle_seconds`, with a count of
    the others: a table locked for minutes must not log each retry."""

    def __init__(self, settle_seconds: float = 10.0) -> None:
        self.settle_seconds = settle_seconds
        self.kind: str | None = None
        self.logged: set[str] = set()  # the kinds this outage has logged
        self.since = 0.0
        self.last_failure = 0.0
        self.refusals: dict[str, tuple[float, int]] = {}  # kind: (when last logged, not logged since)

    def report(self, exc: BaseException, where: str) -> Failure | None:
        """Classify `exc` and log it if it starts an outage (or is a one-off refusal); None (and
        nothing logged) when it is not a database failure."""
        failure = classify(exc)
        if failure is None:
            return None
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if not failure.outage:
            self._refused(failure, where, first_line)
            return failure
        self.last_failure = time.monotonic()
        if self.kind is None:
            self.since, self.logged = self.last_failure, set()
        self.kind = failure.kind
        if failure.kind not in self.logged and not (failure is UNREACHABLE and self.logged):
            self.logged.add(failure.kind)
            log.warning("%s: %s (%s)", where, failure.detail, first_line)
        return failure

    def _refused(self, failure: Failure, where: str, first_line: str) -> None:
        now = time.monotonic()
        logged, unlogged = self.refusals.get(failure.kind, (-self.settle_seconds, 0))
        if now - logged < self.settle_seconds:
            self.refusals[failure.kind] = (logged, unlogged + 1)
            return
        more = f" [{unlogged} more since the last such line]" if unlogged else ""
        log.warning("%s: %s (%s)%s", where, failure.detail, first_line, more)
        self.refusals[failure.kind] = (now, 0)

    def recovered(self) -> None:
        """A unit of work that may write was committed (`Database.session`)."""
        if self.kind is not None and time.monotonic() - self.last_failure >= self.settle_seconds:
            self._end()

    def connected(self) -> None:
        """A connection was made: the end of an outage of connections (down, refusing, missing,
        full), not of one a connection does not cure (a full disk, missing tables)."""
        if self.kind in _CONNECTION_KINDS:
            self._end()

    def _end(self) -> None:
        self.kind = None
        log.warning("database reachable again after %.1f s", time.monotonic() - self.since)


OUTAGES = OutageLog()  # the process's: its API, its engine and its streams share the database


def _connect_failures(dialect: Dialect) -> tuple[type[BaseException], ...]:
    import asyncpg

    dbapi: Any = dialect.loaded_dbapi
    return (
        OSError,  # refused, unreachable, timed out, unknown host
        dbapi.Error,  # the server's refusal, as the driver adapter translated it: see below
        asyncpg.PostgresError,  # starting up, full, no such database, authentication, ...
        asyncpg.InterfaceError,  # closed during the handshake
    )


def watch_connections(engine: AsyncEngine) -> None:
    """Connects that fail, and the end of an outage.

    asyncpg raises a bare OSError when the server is down, which SQLAlchemy passes through
    unwrapped (only DBAPI errors are wrapped), and a server's refusal (no such database, too many
    connections) becomes a generic DBAPI Error: make every failed connect the DBAPI
    OperationalError it is, with the server's SQLSTATE and the original as its cause, so every
    caller sees one kind of error for "unreachable". A connection made ends an outage of
    connections (`OUTAGES.connected`)."""
    if engine.dialect.name != "postgresql":
        return
    failures = _connect_failures(engine.dialect)

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            connection = dialect.connect(*cargs, **cparams)
        except failures as exc:
            dbapi: Any = dialect.loaded_dbapi
            error = dbapi.OperationalError(f"cannot connect to the database: {exc}", exc)
            error.connect_failed = True
            raise error from exc
        OUTAGES.connected()
        return connection
