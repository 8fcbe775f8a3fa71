"""A unit of work's commit does what a write does, visibly: the events recorded are written, the
transaction commits, then the topics published are announced (in this process to the listeners,
across processes through PostgreSQL NOTIFY). A rollback writes and announces nothing; a read
session refuses every write."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.config import Settings
from orchestrator.core.ids import new_job_id
from orchestrator.db import precompiled, topics
from orchestrator.db.models import Event, Job
from orchestrator.db.session import Database, ReadOnlySessionError
from orchestrator.db.topics import Topic
from orchestrator.db.unit_of_work import UnitOfWork, unit_of_work

WAIT = 60.0  # seconds: generous, the machine is shared


def run(settings: Settings, body: Callable[[Database], Awaitable[None]]) -> None:
    async def scenario() -> None:
        database = Database(settings)
        try:
            await body(database)
        finally:
            await database.dispose()

    asyncio.run(scenario())


@pytest.fixture
def announced() -> Iterator[list[set[str]]]:
    """The topics of every unit of work this process commits, in order."""
    seen: list[set[str]] = []
    topics.add_listener(seen.append)
    try:
        yield seen
    finally:
        topics.remove_listener(seen.append)


class Notifications:
    """What PostgreSQL delivers on the channel to another connection (nothing on SQLite)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.arrived = asyncio.Event()

    def __call__(self, *args: Any) -> None:
        self.received.append(args[-1])  # (connection, pid, channel, payload)
        self.arrived.set()

    async def until(self, topic: str) -> list[str]:
        async with asyncio.timeout(WAIT):
            while topic not in self.received:
                self.arrived.clear()
                await self.arrived.wait()
        return self.received


async def listening(database: Database, stack: list[Any]) -> Notifications | None:
    if not database.is_postgres:
        return None
    notifications = Notifications()
    connection = await database.engine.connect()
    stack.append(connection)
    raw = await connection.get_raw_connection()
    await raw.driver_connection.add_listener(topics.CHANNEL, notifications)  # type: ignore[union-attr]
    return notifications


async def events_of(database: Database, job_id: str) -> list[tuple[str, str | None]]:
    async with database.read_session() as session:
        rows = await session.execute(
            select(Event.kind, Event.reason).where(Event.job_id == job_id).order_by(Event.id)
        )
        return [(kind, reason) for kind, reason in rows]


def test_commit_writes_the_events_then_announces_the_topics(
    settings: Settings, announced: list[set[str]]
) -> None:
    job_id = new_job_id()

    async def body(database: Database) -> None:
        connections: list[Any] = []
        notifications = await listening(database, connections)
        try:
            async with database.session() as session:
                assert isinstance(session, UnitOfWork)
                session.record_event(job_id=job_id, kind="job.status", actor="t", reason="first")
                session.record_event(job_id=job_id, kind="agent.note", actor="t", reason="second")
                await session.publish(Topic.JOBS)
                await session.publish(Topic.CONTROL)
                await session.publish(Topic.JOBS)  # once is enough
                assert len(session.pending_events) == 2 and session.topics == {Topic.JOBS, Topic.CONTROL}
                assert await events_of(database, job_id) == []  # nothing written before the commit
                assert announced == []  # nothing announced before it either
            assert await events_of(database, job_id) == [("job.status", "first"), ("agent.note", "second")]
            assert announced == [{"jobs", "control"}]
            if notifications is not None:
                received = await notifications.until("control")
                assert sorted(received) == ["control", "jobs"]
        finally:
            for connection in connections:
                await connection.close()

    run(settings, body)


def test_a_rollback_writes_no_event_and_announces_nothing(
    settings: Settings, announced: list[set[str]]
) -> None:
    dropped, kept = new_job_id(), new_job_id()

    async def body(database: Database) -> None:
        connections: list[Any] = []
        notifications = await listening(database, connections)
        try:
            with pytest.raises(RuntimeError, match="fails"):
                async with database.session() as session:
                    session.record_event(job_id=dropped, kind="job.status", actor="t")
                    await session.publish(Topic.JOBS)
                    raise RuntimeError("the unit of work fails")
            # The same session after an explicit rollback: what came before it is gone.
            async with database.session() as session:
                session.record_event(job_id=dropped, kind="job.status", actor="t")
                await session.publish(Topic.CONTROL)
                await session.rollback()
                assert session.pending_events == [] and session.topics == set()
                session.record_event(job_id=kept, kind="job.status", actor="t")
                await session.publish(Topic.LOGS)
            assert await events_of(database, dropped) == []
            assert await events_of(database, kept) == [("job.status", None)]
            assert announced == [{"logs"}]
            if notifications is not None:
                # NOTIFY is delivered in commit order: by the time "logs" arrives, the rolled
                # back topics would have arrived before it.
                assert await notifications.until("logs") == ["logs"]
        finally:
            for connection in connections:
                await connection.close()

    run(settings, body)


def test_a_read_session_refuses_every_write(settings: Settings, announced: list[set[str]]) -> None:
    job_id = new_job_id()
    insert_event = insert(Event).values(job_id=job_id, kind="k", actor="t")
    rename = precompiled.Statement(update(Job).where(Job.id == job_id).values(priority=1))

    async def body(database: Database) -> None:
        attempts: list[Callable[[AsyncSession], Awaitable[Any]]] = [
            lambda session: session.execute(insert_event),
            lambda session: session.scalar(insert_event.returning(Event.id)),
            lambda session: precompiled.execute(session, rename),
            lambda session: precompiled.execute_many(session, rename, [{}]),
        ]
        for attempt in attempts:
            with pytest.raises(ReadOnlySessionError):
                async with database.read_session() as session:
                    await attempt(session)
        with pytest.raises(ReadOnlySessionError):
            async with database.read_session() as session:
                session.add(Event(job_id=job_id, kind="k", actor="t"))
                await session.commit()
        with pytest.raises(ReadOnlySessionError):
            async with database.read_session() as session:
                session.add(Event(job_id=job_id, kind="k", actor="t"))
                await session.flush()
        with pytest.raises(ReadOnlySessionError):
            async with database.read_session() as session:
                session.add(Event(job_id=job_id, kind="k", actor="t"))  # written at commit, if allowed
        async with database.read_session() as session:  # reads are what it is for
            assert (
                await session.scalar(select(func.count()).select_from(Event).where(Event.job_id == job_id))
                == 0
            )
        assert announced == []

    run(settings, body)


def test_a_unit_of_work_is_asked_for_by_type(settings: Settings, announced: list[set[str]]) -> None:
    """Code that holds its session as a plain AsyncSession reaches the unit of work's methods
    through `unit_of_work(session)`, which refuses a session that is not one."""
    job_id = new_job_id()

    async def body(database: Database) -> None:
        async with database.session() as session:
            unit_of_work(session).record_event(job_id=job_id, kind="job.status", actor="t", reason="r")
            await unit_of_work(session).publish(Topic.JOBS)
        assert await events_of(database, job_id) == [("job.status", "r")]
        assert announced == [{"jobs"}]
        async with AsyncSession(database.engine) as plain:
            with pytest.raises(TypeError, match="not a unit of work"):
                unit_of_work(plain).record_event(job_id=job_id, kind="k", actor="t")

    run(settings, body)
