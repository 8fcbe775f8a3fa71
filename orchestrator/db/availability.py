"""Telling "the database is unreachable" apart from every other database error.

A restarted or unreachable database is an outage to wait out, not a bug: the API answers 503 (the
client may retry) instead of 500, and the engine's loops back off and retry quietly instead of
logging a traceback per attempt. Nothing else is classified here: a constraint violation or a bad
statement must still surface as what it is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

# SQLSTATEs of a server that is going away, starting up or full: class 08 (connection exception),
# admin/crash shutdown, "cannot connect now", too many connections.
UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached (or dropped the connection)."""
    if isinstance(exc, (OperationalError, PoolTimeout)):
        return True
    if isinstance(exc, ConnectionError) or type(exc).__module__.startswith("asyncpg"):
        # A raw asyncpg connection (the engine's LISTEN): refused, reset, or closed by the server.
        return _asyncpg_connection_lost(exc)
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and (sqlstate.startswith("08") or sqlstate in UNAVAILABLE_SQLSTATES)


def _asyncpg_connection_lost(exc: BaseException) -> bool:
    import asyncpg

    lost = (ConnectionError, asyncpg.PostgresConnectionError, asyncpg.ConnectionDoesNotExistError)
    if isinstance(exc, lost):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and (sqlstate.startswith("08") or sqlstate in UNAVAILABLE_SQLSTATES)


def _connect_failures() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (
        OSError,  # refused, unreachable, timed out, unknown host
        asyncpg.CannotConnectNowError,  # starting up or shutting down
        asyncpg.TooManyConnectionsError,
        asyncpg.ConnectionDoesNotExistError,  # closed during the handshake
    )


def translate_connect_errors(engine: AsyncEngine) -> None:
    """asyncpg raises a bare OSError when the server is down, which SQLAlchemy passes through
    unwrapped (only DBAPI errors are wrapped): make a failed connect the DBAPI OperationalError it
    is, so every caller sees one kind of error for "unreachable", with the original as its cause."""
    failures = _connect_failures()

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except failures as exc:
            dbapi: Any = dialect.loaded_dbapi
            raise dbapi.OperationalError(f"cannot connect to the database: {exc}", exc) from exc
