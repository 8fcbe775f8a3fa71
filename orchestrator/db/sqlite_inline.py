"""SQLite for the async engine without a thread hop per call.

SQLAlchemy's aiosqlite driver sends every cursor call (open, execute, fetch, close) to a
per-connection thread and back: four hops per statement, each costing far more than SQLite takes
to run a small statement on a WAL database (figures in docs/BENCHMARKS.md). This shim has the shape
SQLAlchemy's aiosqlite adapter expects, but runs each call inline in the event loop.

Blocking is bounded: the connection's busy timeout is 0, so a call either runs at once (readers
never wait in WAL mode; a writer holding the lock runs its statements without waiting) or fails
with "database is locked" because another *process* holds the write lock. Only then does the call
go to a thread, with the full busy timeout, so the event loop never sleeps on a file lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _is_busy(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


class _Waiting:
    """Runs a call inline; if the database is locked by another process, waits in a thread."""

    def __init__(self, conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
        self.conn = conn
        self.busy_timeout_ms = busy_timeout_ms

    async def run(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except sqlite3.OperationalError as error:
            if not _is_busy(error) or self.busy_timeout_ms <= 0:
                raise
        return await asyncio.to_thread(self._run_waiting, call)

    def _run_waiting(self, call: Callable[[], T]) -> T:
        self.conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        try:
            return call()
        finally:
            self.conn.execute("PRAGMA busy_timeout=0")


class InlineCursor:
    def __init__(self, cursor: sqlite3.Cursor, waiting: _Waiting) -> None:
        self._cursor = cursor
        self._waiting = waiting

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, operation: str, parameters: Any = ()) -> InlineCursor:
        await self._waiting.run(lambda: self._cursor.execute(operation, parameters))
        return self

    async def executemany(self, operation: str, seq_of_parameters: Iterable[Any]) -> InlineCursor:
        rows = list(seq_of_parameters)
        await self._waiting.run(lambda: self._cursor.executemany(operation, rows))
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> Sequence[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    async def nextset(self) -> None:
        return None

    async def setinputsizes(self, *_sizes: Any) -> None:
        return None


class _ImmediateQueue:
    """SQLAlchemy's adapter sets isolation_level by queueing a call on aiosqlite's thread."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as error:
            if future is not None:
                future.set_exception(error)
            return
        if future is not None:
            future.set_result(result)


class InlineConnection:
    """What SQLAlchemy's aiosqlite adapter uses of an aiosqlite connection."""

    def __init__(self, conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
        self._conn = conn
        self._connection: sqlite3.Connection | None = conn
        self._tx = _ImmediateQueue()
        self._waiting = _Waiting(conn, busy_timeout_ms)

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    @property
    def connection(self) -> sqlite3.Connection:
        """The sqlite3 connection itself (orchestrator.db.precompiled runs statements on it)."""
        return self._conn

    async def run_inline(self, call: Callable[[], T]) -> T:
        """Run a call on the connection inline (in a thread only while another process holds
        the write lock)."""
        return await self._waiting.run(call)

    def cursor(self) -> InlineCursor:
        return InlineCursor(self._conn.cursor(), self._waiting)

    async def execute(self, operation: str, parameters: Any = ()) -> InlineCursor:
        cursor = self.cursor()
        return await cursor.execute(operation, parameters)

    async def commit(self) -> None:
        await self._waiting.run(self._conn.commit)

    async def rollback(self) -> None:
        await self._waiting.run(self._conn.rollback)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)


def inline_connector(path: str, busy_timeout_ms: int) -> Callable[[], Awaitable[InlineConnection]]:
    """An `async_creator` for create_async_engine("sqlite+aiosqlite://...")."""

    async def connect() -> InlineConnection:
        def open_connection() -> sqlite3.Connection:
            conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, check_same_thread=False)
            conn.isolation_level = None
            conn.execute("PRAGMA busy_timeout=0")
            return conn

        # Opening may wait on a lock (WAL recovery): do it off the event loop.
        return InlineConnection(await asyncio.to_thread(open_connection), busy_timeout_ms)

    return connect
