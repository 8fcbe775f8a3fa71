"""A database's data version read outside any request's session (db/counts.py says what a
version is), so that a request answered from memory takes no connection from the pool.

Reading it through the request's own session cost a pool checkout, a round trip through
SQLAlchemy and, with more requests in flight than the pool holds, a new connection opened and
closed per request: most of a remembered page's cost.

* PostgreSQL: reads are shared. A request waits for the next read *sent after it arrived* (never
  one already in flight, whose snapshot may predate a commit its client saw end), so a commit
  made by any process before the request arrived is in the version it gets; requests that come
  while a read is in flight all share the one after it.
* SQLite: a connection of the process's own, in autocommit, that reads `PRAGMA data_version`
  (microseconds, on the event loop like every SQLite statement here). It makes no changes, so
  its version moves exactly when another connection commits. A busy database (a checkpoint)
  gives None rather than waiting: the caller reads in its session as before.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import Hashable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

_PG_SNAPSHOT = text("SELECT pg_current_snapshot()::text")


class SharedReads:
    """PostgreSQL's version reads of one engine, each shared by the requests that arrived before
    it was sent."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.next: asyncio.Future[str] | None = None  # the read not sent yet: its waiters
        self.reader: asyncio.Task[None] | None = None

    async def read(self) -> str:
        if self.next is None:
            self.next = asyncio.get_running_loop().create_future()
            self.next.add_done_callback(_retrieved)
        if self.reader is None:
            self.reader = asyncio.get_running_loop().create_task(self._read_while_waited())
        return await asyncio.shield(self.next)

    async def _read_while_waited(self) -> None:
        try:
            while self.next is not None:
                # Taken before the statement is sent: whoever joins from here on waits for the next.
                waiters, self.next = self.next, None
                try:
                    async with self.engine.connect() as connection:
                        version = (await connection.execute(_PG_SNAPSHOT)).scalar_one()
                except asyncio.CancelledError:
                    waiters.cancel()
                    raise
                except Exception as exc:
                    if not waiters.done():
                        waiters.set_exception(exc)
                else:
                    if not waiters.done():
                        waiters.set_result(str(version))
        finally:
            self.reader = None
            if self.next is not None and not self.next.done():
                self.next.cancel()  # the loop is ending
            self.next = None


def _retrieved(future: asyncio.Future[str]) -> None:
    """A failed read nobody awaited any more is not an 'exception never retrieved'."""
    if not future.cancelled():
        future.exception()


class Watcher:
    """A SQLite file's connection that only reads its data version."""

    def __init__(self, path: str) -> None:
        # timeout=0: a busy database answers at once (None below) instead of holding the loop.
        self.connection = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        # What callers remember at this connection's versions (jobs/pages.py: pages).
        self.remembered: dict[Hashable, Any] = {}

    def version(self) -> str | None:
        try:
            row = self.connection.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            return None
        return f"w{row[0]}"


_shared: weakref.WeakKeyDictionary[Pool, SharedReads] = weakref.WeakKeyDictionary()
_watchers: weakref.WeakKeyDictionary[Pool, Watcher | None] = weakref.WeakKeyDictionary()


def shared_reads(engine: AsyncEngine) -> SharedReads:
    """The engine's shared reads (per pool: a disposed engine's new pool starts afresh)."""
    pool = engine.sync_engine.pool
    found = _shared.get(pool)
    if found is None:
        found = _shared[pool] = SharedReads(engine)
    return found


def watcher(engine: AsyncEngine) -> Watcher | None:
    """The watching connection of a SQLite file engine; None for a database in memory."""
    pool = engine.sync_engine.pool
    if pool in _watchers:
        return _watchers[pool]
    path: Any = engine.url.database
    found = None
    if path and path != ":memory:" and not str(path).startswith("file:"):
        found = Watcher(str(path))
        weakref.finalize(pool, found.connection.close)
    _watchers[pool] = found
    return found
