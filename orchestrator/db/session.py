"""Async engine and sessions (units of work: db/unit_of_work.py), with SQLite tuned for several
processes writing at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from orchestrator.core.config import Settings
from orchestrator.db.availability import CONNECT_TIMEOUT_SECONDS, OUTAGES, watch_connections
from orchestrator.db.pool_liveness import drop_dead_connections
from orchestrator.db.sqlite_inline import inline_connector
from orchestrator.db.topics import CHANNEL, Topic
from orchestrator.db.unit_of_work import ReadOnlySessionError, ReadSession, UnitOfWork
from orchestrator.db.write_lock import FileWriteLock

__all__ = ["Database", "ReadOnlySessionError", "make_engine"]

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 60_000

# How an engine's connections name themselves to PostgreSQL (`pg_stat_activity`), and what they
# set when they connect (Database.for_engine).
ENGINE_APPLICATION_NAME = "orchestrator engine"
CUSTOM_PLANS = "SET plan_cache_mode = force_custom_plan"

# Execution option of the engine that read sessions use: their transactions are deferred.
READ_ONLY = "orchestrator_read_only"


def make_engine(settings: Settings, *, custom_plans: bool = False) -> AsyncEngine:
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
    connect_args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_SECONDS}
    if custom_plans:
        # An engine's few connections (Database.for_engine says why), named for pg_stat_activity.
        connect_args["server_settings"] = {"application_name": ENGINE_APPLICATION_NAME}
        engine = create_async_engine(url, pool_size=5, max_overflow=10, connect_args=connect_args)
        _plan_for_the_tables_as_they_are(engine)
    else:
        # At most 30 connections a process, as before, but 20 of them kept: with 32 requests in
        # flight a pool of 10 connected and closed an overflow connection per request (py-spy
        # under wrk).
        engine = create_async_engine(url, pool_size=20, max_overflow=10, connect_args=connect_args)
    watch_connections(engine)  # a server that is down or refusing: OperationalError, not a bare OSError
    drop_dead_connections(engine)  # instead of pool_pre_ping's three round trips a request
    return engine


def _plan_for_the_tables_as_they_are(engine: AsyncEngine) -> None:
    """Each new connection plans every statement for its parameters and the tables as they are
    (Database.for_engine says why). Set after connecting rather than as a startup parameter,
    which a connection pooler such as PgBouncer refuses unless told to ignore it."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.run_async(lambda connection: connection.execute(CUSTOM_PLANS))


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

    def __init__(self, settings: Settings, *, custom_plans: bool = False) -> None:
        self.settings = settings
        self.engine = make_engine(settings, custom_plans=custom_plans)
        # No autoflush: services flush where they need to, and the event rows a transaction adds
        # then go out as one multi-row INSERT at commit instead of one round trip each.
        self.sessionmaker = async_sessionmaker(
            self.engine, class_=UnitOfWork, expire_on_commit=False, autoflush=False
        )
        # Read sessions share the pool; their connections begin deferred on SQLite (see
        # _tune_sqlite), and they are not queued behind this process's writers. On PostgreSQL
        # they run in autocommit: under READ COMMITTED each statement has its own snapshot
        # anyway, so a transaction around them only added BEGIN and COMMIT, two round trips.
        autocommit = {"isolation_level": "AUTOCOMMIT"} if self.is_postgres else {}
        self.read_sessionmaker = async_sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}, **autocommit),
            class_=ReadSession,
            expire_on_commit=False,
            autoflush=False,
        )
        # SQLite has one writer at a time. Queue this process's transactions here, in order, rather
        # than letting them poll the file lock (SQLite's busy handler sleeps up to 100 ms a try),
        # and the processes' on a file lock beside the database (db/write_lock.py).
        self._write_lock: asyncio.Lock | None = None if self.is_postgres else asyncio.Lock()
        self._turn_of: asyncio.Task[object] | None = None  # the task whose turn it is to write
        path = self.engine.url.database
        self._file_lock = FileWriteLock(path) if self._write_lock and path and path != ":memory:" else None
        self._to_notify: set[Topic] = set()  # PostgreSQL: committed, not yet told (notify_committed)
        self._notifier: asyncio.Task[None] | None = None
        self._notify_connection: Any = None  # a raw asyncpg connection of its own, made when needed

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @classmethod
    def for_engine(cls, settings: Settings) -> Database:
        """The database as an engine uses it. On PostgreSQL its connections plan every statement
        for its parameters and the tables as they are at that moment (`plan_cache_mode =
        force_custom_plan`): the engine runs the same prepared statements thousands of times,
        and the plan PostgreSQL otherwise caches for one after its fifth run was made when the
        tables were small. On a new database, or in a burst before autovacuum's next ANALYZE,
        that plan kept scanning `workers` whole once per job (the "no live worker" anti-joins),
        and a pass slowed down as the tables grew (docs/BENCHMARKS.md). Planning costs the
        server a fraction of a millisecond a statement; the API's statements, many per request
        and small, keep the cached plans (their own pool)."""
        return cls(settings, custom_plans=True)

    def engine_database(self) -> Database:
        """This process's database for an engine running in it: this one on SQLite (the
        process's writers share one write lock), one with its own connections on PostgreSQL
        (`for_engine`), for the caller to dispose of after the engine stopped."""
        return self.for_engine(self.settings) if self.is_postgres else self

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
    async def autocommit_connection(self) -> AsyncIterator[AsyncConnection]:
        """PostgreSQL: a connection on which each statement is a transaction of its own,
        committed when it answers (an executemany: all its rows, or none). For a write that
        needs no reads before it (jobs/group_commit.py: plain root submits): no BEGIN and no
        COMMIT round trips."""
        if not self.is_postgres:
            raise RuntimeError("autocommit writes are for PostgreSQL (SQLite writes under its write lock)")
        async with self.engine.connect() as connection:
            yield await connection.execution_options(isolation_level="AUTOCOMMIT")
        OUTAGES.recovered()

    @asynccontextmanager
    async def read_session(self) -> AsyncIterator[ReadSession]:
        """Reads that never take or wait for the write lock: on SQLite one transaction (a
        consistent snapshot), on PostgreSQL statements in autocommit (each its own snapshot, as
        in a READ COMMITTED transaction). Any write through it raises ReadOnlySessionError."""
        async with self.read_sessionmaker() as session:
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise
            await session.commit()

    @asynccontextmanager
    async def write_turn(self) -> AsyncIterator[None]:
        """SQLite: this task's turn to write (the process's lock, then the processes' file lock),
        for its sessions inside the block; PostgreSQL: nothing. A task that waits for its turn
        before it decides what to write (jobs/group_commit.py) writes what came in meanwhile."""
        async with self._serialized():
            yield

    @asynccontextmanager
    async def _serialized(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        if self._write_lock is None or (task is not None and task is self._turn_of):
            yield  # PostgreSQL, or the task's sessions inside its write_turn
            return
        async with self._write_lock, self._file_lock.held() if self._file_lock else contextlib.nullcontext():
            self._turn_of = task
            try:
                yield
            finally:
                self._turn_of = None

    def notify_committed(self, topic: Topic) -> None:
        """PostgreSQL: tell the other processes (NOTIFY on CHANNEL) that a transaction of
        `topic` has committed, from a transaction of its own sent after it, one at a time: the
        commits made while one is under way are told by the next. For the submits' transactions
        (jobs/group_commit.py): a NOTIFY in a transaction takes a lock, for the whole database
        cluster, from before its COMMIT until the commit is on disk, so the committing
        transactions of every process that notified were flushed one after another, never
        together. SQLite: nothing (no other process listens)."""
        if not self.is_postgres:
            return
        self._to_notify.add(topic)
        if self._notifier is None:
            self._notifier = asyncio.get_running_loop().create_task(self._notify(), name="notify-commits")

    async def _notify(self) -> None:
        try:
            while self._to_notify:
                topics, self._to_notify = self._to_notify, set()
                # One simple query, no pool: what it costs is per transaction of submits. Not
                # flushed to disk (it wrote nothing), so it holds the NOTIFY lock only briefly.
                notices = ", ".join(f"pg_notify('{CHANNEL}', '{topic.value}')" for topic in sorted(topics))
                try:
                    await self._send_notify(
                        f"SELECT set_config('synchronous_commit', 'off', true), {notices}"
                    )
                except Exception as exc:  # the listeners' own polls find what they missed
                    if OUTAGES.report(exc, "notifying the commits of submits") is None:
                        log.warning("notifying the commits of submits failed: %s", exc)
        finally:
            self._notifier = None

    async def _send_notify(self, query: str) -> None:
        """On this Database's own connection, made when first needed; once more on a new one if
        that one was lost while it idled (a server restart): a NOTIFY sent twice only wakes twice."""
        while True:
            fresh = self._notify_connection is None
            try:
                if self._notify_connection is None:
                    import asyncpg

                    dsn = self.settings.async_database_url.replace(
                        "postgresql+asyncpg://", "postgresql://", 1
                    )
                    self._notify_connection = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SECONDS)
                await self._notify_connection.execute(query)
                return
            except Exception:
                await self._close_notify_connection()
                if fresh:
                    raise

    async def _close_notify_connection(self) -> None:
        connection, self._notify_connection = self._notify_connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT_SECONDS)
            connection.terminate()  # if close() could not say goodbye; else a no-op

    async def dispose(self) -> None:
        notifier, self._notifier = self._notifier, None
        if notifier is not None and notifier.get_loop() is asyncio.get_running_loop():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(notifier, CONNECT_TIMEOUT_SECONDS)  # committed: tell it
        await self._close_notify_connection()
        await self.engine.dispose()
        if self._file_lock is not None:
            self._file_lock.close()
