"""Statements run on the driver (orchestrator.db.precompiled) store and read exactly what the same
statements store and read through SQLAlchemy's session, in the session's transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest
from sqlalchemy import DateTime, Table, bindparam, insert, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.config import Settings
from orchestrator.db import precompiled
from orchestrator.db.models import Job, UTCDateTime, Worker
from orchestrator.db.session import Database

JOBS = cast(Table, Job.__table__)
WORKERS = cast(Table, Worker.__table__)
_IDS = bindparam("ids", expanding=True)
SELECT_WORKERS = select(
    Worker.id, Worker.status, Worker.holds_slot, Worker.result, Worker.started_at, Worker.pid_start_time
).where(Worker.id.in_(_IDS), Worker.status.in_(("RUNNING", "PAUSED")))
FAST_SELECT = precompiled.Statement(SELECT_WORKERS)
NOT_IN = (
    select(Worker.id).where(Worker.job_id == bindparam("job"), Worker.id.not_in(_IDS)).order_by(Worker.id)
)
FAST_NOT_IN = precompiled.Statement(NOT_IN)
SET_RESULT = (
    update(WORKERS)
    .where(WORKERS.c.id == bindparam("b_id"))
    .values(result=bindparam("result"), started_at=bindparam("started_at"), holds_slot=bindparam("holds"))
)
FAST_SET_RESULT = precompiled.Statement(SET_RESULT)
RELEASE = precompiled.Statement(
    update(Worker)
    .where(Worker.id.in_(_IDS), Worker.holds_slot.is_(True))
    .values(holds_slot=False)
    .returning(Worker.id, Worker.finished_at)
)
INSERT_JOB = precompiled.Statement(insert(JOBS))


def run(settings: Settings, body: Callable[[Database], Awaitable[None]]) -> None:
    async def scenario() -> None:
        database = Database(settings)
        try:
            await body(database)
        finally:
            await database.dispose()

    asyncio.run(scenario())


def job_row(job_id: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": job_id,
        "status": "RUNNING",
        "task_description": "t",
        "worker_count": 3,
        "depth": 0,
        "parent_job_id": None,
        "path": f"{job_id}/",
        "priority": 0,
        "agent": "simulated",
        "agent_options": {"a": [1, 2]},
        "timeout_seconds": None,
        "repository": None,
        "base_ref": None,
        "workspace_id": None,
        "created_by": "tester",
        "created_by_worker_id": None,
        "engine_id": None,
        "status_reason": None,
        "max_cost_usd": None,
        "max_turns": None,
        "delegation_key": None,
        "limits": None,
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
    }


async def add_job_with_workers(session: AsyncSession, job_id: str) -> list[str]:
    await session.execute(insert(JOBS), [job_row(job_id)])
    ids = [f"{job_id}w{i}" for i in range(3)]
    now = datetime.now(UTC)
    session.add_all(
        Worker(
            id=worker_id,
            job_id=job_id,
            status="RUNNING",
            worker_index=i,
            depth=0,
            agent="simulated",
            holds_slot=True,
            pid_start_time=2**40 + i,
            created_at=now,
            updated_at=now,
        )
        for i, worker_id in enumerate(ids)
    )
    await session.flush()
    return ids


def test_values_written_on_the_driver_are_stored_as_sqlalchemy_stores_them(settings: Settings) -> None:
    """Same values, one row through the session and one on the driver: the database holds the
    same text for both (on SQLite, datetimes are strings that must sort and compare alike)."""
    started = datetime(2026, 11, 27, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    values = {"result": {"k": [1, "two", None], "n": 1.5}, "started_at": started, "holds": False}

    async def body(database: Database) -> None:
        async with database.session() as session:
            ids = await add_job_with_workers(session, "jfast1")
            await session.execute(SET_RESULT, [{"b_id": ids[0], **values}])
            changed = await precompiled.execute_many(session, FAST_SET_RESULT, [{"b_id": ids[1], **values}])
            assert changed == 1
        async with database.session() as session:
            raw = (
                await session.execute(
                    text(
                        "SELECT id, CAST(result AS TEXT), CAST(started_at AS TEXT), holds_slot FROM workers"
                        " WHERE id IN (:a, :b) ORDER BY id"
                    ),
                    {"a": ids[0], "b": ids[1]},
                )
            ).all()
            assert raw[0][1:] == raw[1][1:]
            through_session = (await session.execute(SELECT_WORKERS, {"ids": ids})).all()
            on_driver = await precompiled.fetch(session, FAST_SELECT, {"ids": ids})
            assert [tuple(row) for row in on_driver] == [tuple(row) for row in through_session]
            by_id = {row.id: row for row in on_driver}
            assert by_id[ids[1]].started_at == started  # aware, UTC, microseconds kept
            assert by_id[ids[1]].started_at.tzinfo is not None
            assert by_id[ids[1]].result == values["result"]
            assert by_id[ids[1]].holds_slot is False and by_id[ids[2]].holds_slot is True
            assert by_id[ids[2]].pid_start_time == 2**40 + 2  # a 64-bit value survives

    run(settings, body)


def test_lists_literals_and_returning(settings: Settings) -> None:
    async def body(database: Database) -> None:
        async with database.session() as session:
            ids = await add_job_with_workers(session, "jfast2")
            await session.execute(update(Worker).where(Worker.id == ids[2]).values(status="COMPLETED"))
            # The statement's own literals ('RUNNING', 'PAUSED') apply alongside the IN list.
            rows = await precompiled.fetch(session, FAST_SELECT, {"ids": [*ids, "missing"]})
            assert sorted(row.id for row in rows) == ids[:2]
            # NOT IN, with a list and with an empty one (which matches every row).
            others = await precompiled.fetch(session, FAST_NOT_IN, {"job": "jfast2", "ids": [ids[0]]})
            assert [row.id for row in others] == ids[1:]
            everyone = await precompiled.fetch(session, FAST_NOT_IN, {"job": "jfast2", "ids": []})
            assert [row.id for row in everyone] == ids
            assert await precompiled.fetch(session, FAST_SELECT, {"ids": []}) == []
            released = await precompiled.fetch(session, RELEASE, {"ids": ids[:2]})
            assert sorted(row.id for row in released) == ids[:2]
            assert all(row.finished_at is None for row in released)
            assert await precompiled.fetch(session, RELEASE, {"ids": ids[:2]}) == []  # released already
            assert await precompiled.execute(session, FAST_SET_RESULT, {"b_id": "missing", **_nothing()}) == 0

    run(settings, body)


def _nothing() -> dict[str, Any]:
    return {"result": None, "started_at": None, "holds": False}


def test_writes_on_the_driver_belong_to_the_session_transaction(settings: Settings) -> None:
    async def body(database: Database) -> None:
        with pytest.raises(RuntimeError):
            async with database.session() as session:
                await precompiled.execute_many(session, INSERT_JOB, [job_row("jfast3")])
                raise RuntimeError("roll back")
        async with database.session() as session:
            assert await session.get(Job, "jfast3") is None
            await precompiled.execute_many(session, INSERT_JOB, [job_row("jfast3")])
        async with database.session() as session:
            job = await session.get(Job, "jfast3")
            assert job is not None and job.agent_options == {"a": [1, 2]}

    run(settings, body)


def test_a_constraint_violation_is_sqlalchemy_s_integrity_error(settings: Settings) -> None:
    async def body(database: Database) -> None:
        async with database.session() as session:
            await precompiled.execute_many(session, INSERT_JOB, [job_row("jfast4")])
        with pytest.raises(IntegrityError):
            async with database.session() as session:
                await precompiled.execute_many(session, INSERT_JOB, [job_row("jfast4")])  # same key

    run(settings, body)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 27, 12, 30, 15, 123456, tzinfo=UTC),
        datetime(2026, 11, 27, 12, 30, 15, tzinfo=timezone(timedelta(hours=-5))),  # no microseconds
        datetime(1999, 1, 2, 3, 4, 5, 6),  # naive: taken as UTC
    ],
)
def test_sqlite_datetimes_are_the_text_sqlalchemy_writes(moment: datetime) -> None:
    """UTCDateTime makes SQLite's text itself (fast); it must be SQLAlchemy's own, byte for byte,
    so rows written by either sort and compare alike, and read back as the same instant."""
    dialect = sqlite.dialect()
    ours = UTCDateTime().bind_processor(dialect)
    theirs = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert ours is not None and theirs is not None
    as_utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    assert ours(moment) == theirs(as_utc.replace(tzinfo=None))
    read = UTCDateTime().result_processor(dialect, None)
    assert read is not None and read(ours(moment)) == as_utc and read(ours(moment)).tzinfo is not None
    assert ours(None) is None and read(None) is None
