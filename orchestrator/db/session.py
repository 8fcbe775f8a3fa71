"""Async engine and sessions (units of work: db/unit_of_work.py), with SQLite tuned for several
processes writing at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from orchestrator.core.config import Settings
from orchestrator.db.availability import CONNECT_TIMEOUT_SECONDS, OUTAGES, watch_connections
from orchestrator.db.sqlite_inline import inline_connector
from orchestrator.db.unit_of_work import ReadOnlySessionError, ReadSession, UnitOfWork

__all__ = ["Database", "ReadOnlySessionError", "make_engine"]

SQLITE_BUSY_TIMEOUT_MS = 60_000

# Execution option of the engine that read sessions use: their transactions are deferred.
READ_ONLY = "orchestrator_read_only"


def make_engine(settings: Settings) -> AsyncEngine:
    url = settings.async_database_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            poolclass=AsyncAdaptedQueuePool,
            pool_size=5,
            max_overflow=20,
            async_creator=inline_connector(path or ":memory:", SQLITE_BUSY_TIMEOUT_MS),
        )
        _tune_sqlite(engine)
        return engine
    # pool_pre_ping costs a round trip per checkout, but without it the first request on each
    # connection a restarted server dropped fails: a restarted database must lose no request.
    engine = create_async_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        connect_args={"timeout": CONNECT_TIMEOUT_SECONDS},
    )
    watch_connections(engine)  # a server that is down or refusing: OperationalError, not a bare OSError
    return engine


def _tune_sqlite(engine: AsyncEngine) -> None:
    """WAL for concurrent readers; BEGIN IMMEDIATE for units of work that write, so writers queue
    for the lock (in a thread: see sqlite_inline) instead of failing with 'database is locked'
    when a read transaction tries to upgrade. Read sessions (`Database.read_session`) begin
    DEFERRED: on WAL they read a snapshot and never touch the write lock, so no read waits for a
    writer, in this process or another."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


class Database:
    """Holds the engine and the session factory of one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings)
        # No autoflush: services flush where they need to, and the event rows a transaction adds
        # then go out as one multi-row INSERT at commit instead of one round trip each.
        self.sessionmaker = async_sessionmaker(
            self.engine, class_=UnitOfWork, expire_on_commit=False, autoflush=False
        )
        # Read sessions share the pool; their connections begin deferred on SQLite (see
        # _tune_sqlite), and they are not queued behind this process's writers.
        self.read_sessionmaker = async_sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}),
            class_=ReadSession,
            expire_on_commit=False,
            autoflush=False,
        )
        # SQLite has one writer at a time. Queue this process's transactions here, in order, rather
        # than letting them poll the file lock (SQLite's busy handler sleeps up to 100 ms a try).
        self._write_lock: asyncio.Lock | None = None if self.is_postgres else asyncio.Lock()

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[UnitOfWork]:
        """One unit of work that may write: committed when the block ends (its events written,
        its topics announced: UnitOfWork.commit), rolled back on error. On SQLite it holds the
        database's write lock from its first statement to its end."""
        async with self._serialized(), self.sessionmaker() as session:
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise
            await session.commit()
        OUTAGES.recovered()  # a write went through: the end of an outage, if there was one

    @asynccontextmanager
    async def read_session(self) -> AsyncIterator[ReadSession]:
        """One read-only transaction (a consistent snapshot) that never takes or waits for the
        write lock. Any write through it raises ReadOnlySessionError."""
        async with self.read_sessionmaker() as session:
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise
            await session.commit()

    def _serialized(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self._write_lock if self._write_lock is not None else contextlib.nullcontext()

    async def dispose(self) -> None:
        await self.engine.dispose()
