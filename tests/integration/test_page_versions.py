"""A remembered `GET /api/jobs` page is answered without a connection of the request's own: the
data version is read outside the session (orchestrator/db/version_reads.py), shared by the
requests that arrived before it was read on PostgreSQL, by a watching connection on SQLite; and
never a version read before a commit that ended before the request came.

Runs on SQLite and on PostgreSQL (TEST_DATABASE).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, insert, text, update

from orchestrator.db import counts, version_reads
from orchestrator.db.models import Job
from orchestrator.db.session import Database
from orchestrator.jobs import pages
from orchestrator.jobs import repository as jobs_repo
from orchestrator.jobs.schemas import JobList

_serial = iter(range(10**6))


@pytest.fixture
def checkouts(reader: Database) -> Iterator[list[str]]:
    """One entry per connection the reader's pool hands out."""
    seen: list[str] = []

    def record(*_args: Any) -> None:
        seen.append("checkout")

    event.listen(reader.engine.sync_engine.pool, "checkout", record)
    yield seen
    event.remove(reader.engine.sync_engine.pool, "checkout", record)


def _job(tag: str) -> dict[str, Any]:
    job_id = f"j_pv{tag}{next(_serial):06d}"
    now = datetime.now(UTC)
    return {
        "id": job_id,
        "status": "PENDING",
        "task_description": f"version {tag}",
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


async def _add(database: Database, rows: list[dict[str, Any]]) -> list[str]:
    async with database.session() as session:
        await session.execute(insert(Job), rows)
    return [row["id"] for row in rows]


async def _page(database: Database, where: jobs_repo.JobFilter) -> bytes:
    async with database.read_session() as session:
        await asyncio.sleep(0)  # the requests of a gather all arrive before any reads
        return await pages.page_json(session, where, limit=50, offset=0)


async def _snapshot(database: Database) -> str | None:
    if not database.is_postgres:
        return None
    async with database.read_session() as session:
        return str((await session.execute(text("SELECT pg_current_snapshot()::text"))).scalar_one())


async def test_remembered_pages_take_no_connection_each(reader: Database, checkouts: list[str]) -> None:
    """16 requests at once for a remembered page: SQLite takes no connection at all, PostgreSQL
    one for the version they share (a round counts only if no commit elsewhere in the cluster
    came between its first and last statement: the page would then be read again)."""
    await _add(reader, [_job("quiet") for _ in range(3)])
    where = jobs_repo.JobFilter(q="version quiet")
    first = await _page(reader, where)
    for _ in range(200):
        before = await _snapshot(reader)
        assert await _page(reader, where) == first  # read again if a commit came since the last
        checkouts.clear()
        assert set(await asyncio.gather(*(_page(reader, where) for _ in range(16)))) == {first}
        taken = len(checkouts)
        if not reader.is_postgres:
            assert taken == 0
            return
        if await _snapshot(reader) == before:
            assert taken <= 2, f"{taken} connections for 16 remembered pages"
            return
    pytest.fail("no round of 16 pages without a commit elsewhere in the cluster in 200 tries")


async def test_a_commit_that_ends_while_a_version_is_read_is_in_a_later_request_s_page(
    reader: Database, other: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that arrives while a version read is in flight (its snapshot taken, the answer
    not back: here the statement sleeps after taking it) waits for the next read: the commit
    that ended between the two is in its page."""
    if not reader.is_postgres:
        pytest.skip("SQLite reads its version at once, on the event loop: no read is ever in flight")
    slow = text("SELECT pg_current_snapshot()::text FROM pg_sleep(0.5)")
    monkeypatch.setattr(version_reads, "_PG_SNAPSHOT", slow)
    [job_id] = await _add(reader, [_job("flight")])
    where = jobs_repo.JobFilter(q="version flight")
    await _page(reader, where)
    await _page(reader, where)  # remembered now

    async def version() -> str | None:
        async with reader.read_session() as session:
            return await counts.database_version(session)

    early = asyncio.create_task(version())
    early_page = asyncio.create_task(_page(reader, where))
    await asyncio.sleep(0.1)  # their version read is sent: its snapshot predates the commit below
    async with other.session() as session:
        await session.execute(update(Job).where(Job.id == job_id).values(task_description="version flight 2"))
    late = asyncio.create_task(version())
    late_page = JobList.model_validate_json(await _page(reader, where))
    assert late_page.jobs[0].task_description == "version flight 2"
    assert await late != await early, "a request shared a version read sent before it came"
    await early_page


async def test_a_watched_sqlite_file_sees_every_commit(reader: Database, other: Database) -> None:
    """SQLite's watching connection: commits by another pool, by this pool, and inserts all move
    the version, one after the other, with the page remembered in between."""
    if reader.is_postgres:
        pytest.skip("SQLite's watching connection")
    [job_id] = await _add(reader, [_job("watch")])
    where = jobs_repo.JobFilter(q="version watch")
    for n, database in enumerate([other, reader, other, reader]):
        await _page(reader, where)
        await _page(reader, where)  # remembered
        async with database.session() as session:
            await session.execute(
                update(Job).where(Job.id == job_id).values(task_description=f"version watch {n}")
            )
        listed = JobList.model_validate_json(await _page(reader, where))
        assert listed.jobs[0].task_description == f"version watch {n}"
    await _add(other, [_job("watch")])
    assert JobList.model_validate_json(await _page(reader, where)).total == 2


async def test_a_session_that_began_before_a_commit_leaves_no_stale_page(
    reader: Database, other: Database
) -> None:
    """A session that read before (a worker's token is checked in the request's session) holds an
    older snapshot than a version read after a commit: the page it reads is not remembered as of
    that version, so the next request sees the commit."""
    [job_id] = await _add(reader, [_job("begun")])
    where = jobs_repo.JobFilter(q="version begun")
    await _page(reader, where)
    async with reader.read_session() as session:
        await session.execute(text("SELECT count(*) FROM jobs"))  # the transaction begins
        async with other.session() as writing:
            await writing.execute(
                update(Job).where(Job.id == job_id).values(task_description="version begun 2")
            )
        await pages.page_json(session, where, limit=50, offset=0)
    listed = JobList.model_validate_json(await _page(reader, where))
    assert listed.jobs[0].task_description == "version begun 2"
