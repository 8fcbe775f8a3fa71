"""A list page's `total` is remembered while the database is unchanged (orchestrator/db/counts.py),
and is exact all the same: every commit, by this process's pool, another process's engine, or a
bare connection of another program, shows in the next page's total, and a write not yet
committed does not. The COUNT is run again only when something changed.

Runs on SQLite and on PostgreSQL (TEST_DATABASE).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, insert, update

from orchestrator.core.config import Settings
from orchestrator.db.models import Job
from orchestrator.db.session import Database
from orchestrator.jobs import repository as jobs_repo


@pytest.fixture
def counted(reader: Database) -> Iterator[list[str]]:
    """The COUNT statements the reader's engine runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "count(" in statement.lower():
            seen.append(statement)

    event.listen(reader.engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(reader.engine.sync_engine, "before_cursor_execute", record)


_serial = iter(range(10**6))


def _job_row(tag: str, status: str = "PENDING") -> dict[str, Any]:
    job_id = f"j_tot{tag}{next(_serial):06d}"
    now = datetime.now(UTC)
    return {
        "id": job_id,
        "status": status,
        "task_description": f"total {tag}",
        "worker_count": 1,
        "depth": 0,
        "path": f"{job_id}/",
        "priority": 0,
        "agent": "simulated",
        "agent_options": {},
        "created_by": "test",
        "created_at": now,
        "updated_at": now,
    }


async def _add(database: Database, tag: str, count: int = 1) -> list[str]:
    rows = [_job_row(tag) for _ in range(count)]
    async with database.session() as session:
        await session.execute(insert(Job), rows)
    return [row["id"] for row in rows]


async def _total(database: Database, tag: str, **where: Any) -> int:
    """The total of the page of jobs whose task text holds `tag` (each test its own jobs)."""
    async with database.read_session() as session:
        _, total = await jobs_repo.list_jobs(session, jobs_repo.JobFilter(q=f"total {tag}", **where), limit=2)
    return total


async def test_an_unchanged_database_is_counted_once(reader: Database, counted: list[str]) -> None:
    await _add(reader, "once", 3)
    assert await _total(reader, "once") == 3
    counts_before = len(counted)
    for _ in range(5):
        assert await _total(reader, "once") == 3
    assert len(counted) == counts_before, "the total of an unchanged database was counted again"


async def test_every_commit_anywhere_moves_the_total(
    reader: Database, other: Database, settings: Settings
) -> None:
    await _add(reader, "commits", 2)
    assert await _total(reader, "commits") == 2
    await _add(other, "commits")  # another pool (another process's API or engine)
    assert await _total(reader, "commits") == 3
    await _add(reader, "commits")  # this pool: on SQLite, maybe the very connection that counted
    assert await _total(reader, "commits") == 4
    await asyncio.to_thread(_insert_bare, settings.database_url, _job_row("commits"))  # another program
    assert await _total(reader, "commits") == 5


async def test_a_status_change_elsewhere_moves_a_status_total(reader: Database, other: Database) -> None:
    ids = await _add(reader, "status", 3)
    assert await _total(reader, "status", status="PENDING") == 3
    assert await _total(reader, "status", status="CANCELED") == 0
    async with other.session() as session:
        await session.execute(update(Job).where(Job.id == ids[0]).values(status="CANCELED"))
    assert await _total(reader, "status", status="PENDING") == 2
    assert await _total(reader, "status", status="CANCELED") == 1


async def test_a_write_not_yet_committed_is_not_counted(reader: Database, other: Database) -> None:
    """On PostgreSQL the open writer is in progress in the reader's snapshot; on SQLite it holds
    the write lock, which the reader does not wait for."""
    await _add(reader, "open", 2)
    assert await _total(reader, "open") == 2
    async with other.session() as session:
        await session.execute(insert(Job), [_job_row("open")])
        assert await _total(reader, "open") == 2
    assert await _total(reader, "open") == 3


async def test_many_connections_each_see_every_commit(reader: Database, other: Database) -> None:
    """Several read sessions at once hold several pooled connections (SQLite remembers per
    connection): each sees the commit made between two rounds."""
    await _add(reader, "pool", 1)

    async def totals() -> list[int]:
        async def one() -> int:
            async with reader.read_session() as session:
                await asyncio.sleep(0)  # hold the connection while the others take theirs
                _, total = await jobs_repo.list_jobs(session, jobs_repo.JobFilter(q="total pool"), limit=1)
                return total

        return list(await asyncio.gather(*(one() for _ in range(6))))

    assert await totals() == [1] * 6
    await _add(other, "pool")
    assert await totals() == [2] * 6


def _insert_bare(database_url: str, row: dict[str, Any]) -> None:
    """Insert a job through a connection that is not SQLAlchemy's at all."""
    import json

    values = {**row, "agent_options": json.dumps(row["agent_options"])}
    columns = ", ".join(values)
    if database_url.startswith("sqlite"):
        values["created_at"] = values["updated_at"] = row["created_at"].strftime("%Y-%m-%d %H:%M:%S.%f")
        conn = sqlite3.connect(database_url.split("///", 1)[1], timeout=60)
        try:
            with conn:
                conn.execute(
                    f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(values))})",
                    list(values.values()),
                )
        finally:
            conn.close()
        return

    async def pg() -> None:
        import asyncpg

        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
            await conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({placeholders})", *values.values())
        finally:
            await conn.close()

    asyncio.run(pg())
