"""Async engine and sessions, with SQLite tuned for several processes writing at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.pool import AsyncAdaptedQueuePool

from orchestrator.core.config import Settings
from orchestrator.db.availability import translate_connect_errors
from orchestrator.db.models import Event, WorkerLog
from orchestrator.db.sqlite_inline import inline_connector

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
    engine = create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    translate_connect_errors(engine)  # a server that is down: OperationalError, not a bare OSError
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


class ReadOnlySessionError(RuntimeError):
    """A read session was asked to write: a bug in the caller, which must use `Database.session`."""


@event.listens_for(Session, "do_orm_execute")
def _reads_only(state: ORMExecuteState) -> None:
    if state.session.info.get(READ_ONLY) and (state.is_insert or state.is_update or state.is_delete):
        raise ReadOnlySessionError(f"a read session cannot run {state.statement.__class__.__name__}")


@event.listens_for(Session, "before_flush")
def _flushes_nothing(session: Session, _context: object, _instances: object) -> None:
    if session.info.get(READ_ONLY) and (session.new or session.dirty or session.deleted):
        raise ReadOnlySessionError("a read session cannot write rows")


@event.listens_for(Session, "before_commit", insert=True)  # before db.events writes its rows
def _commits_nothing(session: Session) -> None:
    if session.info.get(READ_ONLY) and (session.info.get("pending_events") or session.info.get("notify")):
        raise ReadOnlySessionError("a read session cannot record events or notifications")


@event.listens_for(Session, "do_orm_execute")
def _no_session_synchronization(state: ORMExecuteState) -> None:
    """Bulk UPDATE/DELETE without evaluating their criteria against objects in memory.

    Every read here uses populate_existing, so in-memory copies are never trusted; the default
    ("auto": evaluate in Python, else fetch) cost more CPU than the statements themselves.
    """
    if (state.is_update or state.is_delete) and "synchronize_session" not in state.execution_options:
        state.update_execution_options(synchronize_session=False)


@event.listens_for(Session, "before_flush")
def _xid_before_ordered_inserts(session: Session, _context: object, _instances: object) -> None:
    """On PostgreSQL, take a transaction id before inserting events or log lines.

    Their ids come from sequences (nextval), and PostgreSQL assigns a transaction id only at the
    first write. Without this, a reader's snapshot taken between nextval and that assignment
    would not list the writer as in progress, and the live streams (which deliver ids only up to
    a horizon past every in-progress transaction) could skip the row for good.
    """
    if session.info.get("has_xid"):
        return
    if not any(isinstance(obj, (Event, WorkerLog)) for obj in session.new):
        return
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return
    session.connection().exec_driver_sql("SELECT pg_current_xact_id()")
    session.info["has_xid"] = True


@event.listens_for(Session, "after_transaction_end")
def _forget_xid(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop("has_xid", None)


class Database:
    """Holds the engine and the session factory of one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings)
        # No autoflush: services flush where they need to, and the event rows a transaction adds
        # then go out as one multi-row INSERT at commit instead of one round trip each.
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        # Read sessions share the pool; their connections begin deferred on SQLite (see
        # _tune_sqlite), and they are not queued behind this process's writers.
        self.read_sessionmaker = async_sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}),
            expire_on_commit=False,
            autoflush=False,
            info={READ_ONLY: True},
        )
        # SQLite has one writer at a time. Queue this process's transactions here, in order, rather
        # than letting them poll the file lock (SQLite's busy handler sleeps up to 100 ms a try).
        self._write_lock: asyncio.Lock | None = None if self.is_postgres else asyncio.Lock()

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One unit of work that may write: committed when the block ends, rolled back on error.
        On SQLite it holds the database's write lock from its first statement to its end."""
        async with self._serialized(), self.sessionmaker() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read_session(self) -> AsyncIterator[AsyncSession]:
        """One read-only transaction (a consistent snapshot) that never takes or waits for the
        write lock. Any write through it raises ReadOnlySessionError."""
        async with self.read_sessionmaker() as session, session.begin():
            yield session

    def _serialized(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self._write_lock if self._write_lock is not None else contextlib.nullcontext()

    async def dispose(self) -> None:
        await self.engine.dispose()
