"""A list page's `total` is remembered while the database is unchanged (orchestrator/db/counts.py),
and is exact all the same: every commit, by this process's pool, another process's engine, or a
bare connection of another program, shows in the next page's total, and a write not yet
committed does not. The COUNT is run again only when something changed.

Runs on SQLite and on PostgreSQL (TEST_DATABASE).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, insert, update

from orchestrator.core.config import Settings
from orchestrator.db.models import Job
from orchestrator.db.session import Database
from orchestrator.jobs import repository as jobs_repo
from orchestrator.workers import repository as workers_repo
from orchestrator.workspaces import repository as workspaces_repo


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


async def test_a_job_committed_between_a_pages_statements_is_in_both_or_neither(
    reader: Database, settings: Settings
) -> None:
    """A job committed by another program while a page is read is in the page and its total or
    in neither: `total` is never more or less than the page holds when the page holds all. On
    PostgreSQL each of a read session's statements has its own snapshot: a page read by one
    statement and its total by the next counted a job the page did not list (found in CI, under
    a parent whose children were being submitted).

    Through both ways a page is read, the list's JSON (jobs/pages.py) and the repository's
    rows, the commit made right after the reader's first statement on the jobs (the page alone,
    or the page with its total) or, on PostgreSQL, right after the version read before it (the
    page then at a newer version than a total remembered at the one read); with no total
    remembered, one at an older version, and one at the page's (then no COUNT runs at all)."""
    import json

    from orchestrator.jobs import pages

    postgres = settings.database_url.startswith("postgresql")
    where = jobs_repo.JobFilter(q="total between")
    armed: list[str] = []  # "jobs" or "version": the statement to commit right after
    inserted: list[str] = []
    counted: list[str] = []

    def commit_one_after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        lowered = statement.lower()
        if "count(" in lowered:
            counted.append(statement)
        on_jobs = "from jobs" in lowered
        if armed and (on_jobs if armed[0] == "jobs" else "pg_current_snapshot" in lowered and not on_jobs):
            armed.clear()
            row = _job_row("between")
            # Another program's commit, made and finished while the reader's statement waits.
            thread = threading.Thread(target=_insert_bare, args=(settings.database_url, row))
            thread.start()
            thread.join()
            inserted.append(row["id"])

    async def through_rows() -> tuple[int, int]:
        async with reader.read_session() as session:
            rows, total = await jobs_repo.list_jobs(session, where, limit=50)
        return len(rows), total

    async def through_json() -> tuple[int, int]:
        async with reader.read_session() as session:
            body = json.loads(await pages.page_json(session, where, limit=50, offset=0))
        return len(body["jobs"]), body["total"]

    windows = iter(range(49, 30, -1))

    async def through_json_anew() -> tuple[int, int]:
        """A window not read before: no page remembered, the total perhaps."""
        async with reader.read_session() as session:
            body = json.loads(await pages.page_json(session, where, limit=next(windows), offset=0))
        return len(body["jobs"]), body["total"]

    added = await _add(reader, "between", 2)
    # (read, commit before it, commit during it: after "jobs", after "version", or "none", or
    # "none, no count": the total remembered at the version of the read before). A JSON page
    # read again at its version is answered from memory: a commit before makes it read, or a
    # window not read before.
    reads = [(through_rows, False, "jobs"), (through_rows, True, "jobs")]
    for read in (through_rows, through_json_anew):
        reads += [(read, False, "none"), (read, False, "none, no count"), (read, False, "jobs")]
    reads += [(through_json, True, "jobs")]
    # A remembered JSON page reads the version first: a commit right after it, the total
    # remembered at that version, the page found changed and read at a newer one.
    reads += [(through_json_anew, False, "none"), (through_json, False, "version")] if postgres else []
    reads += [(through_json_anew, True, "jobs")]
    event.listen(reader.engine.sync_engine, "after_cursor_execute", commit_one_after)
    try:
        for read, commit_first, during in reads:
            if commit_first:
                added += await _add(reader, "between")
            armed[:] = [] if during.startswith("none") else [during]
            counted.clear()
            listed, total = await read()
            what = f"{read.__name__}, commit before: {commit_first}, during: {during}"
            assert total == listed, f"{what}: total {total}, page of {listed}"
            assert not armed, f"{what}: no job was committed during the read"
            if during == "none, no count" and postgres:  # SQLite remembers per pooled connection
                assert not counted, f"{what}: counted again at the version of its total"
    finally:
        event.remove(reader.engine.sync_engine, "after_cursor_execute", commit_one_after)
    everything = len(added) + len(inserted)
    assert await through_rows() == (everything, everything)


@pytest.mark.parametrize("listed", ["workers", "workspaces"])
async def test_a_row_committed_while_workers_or_workspaces_are_listed_is_in_both_or_neither(
    reader: Database, settings: Settings, listed: str
) -> None:
    """The same for the lists of workers and of workspaces: a row committed by another program
    after the reader's first statement on the table is in the page and its total or in neither."""
    (job_id,) = await _add(reader, f"{listed} of")
    serial = iter(range(1000))

    def row() -> dict[str, Any]:
        now = datetime.now(UTC)
        if listed == "workspaces":
            return {
                "id": f"ws_tot{next(_serial):06d}",
                "repository": None,
                "root_job_id": job_id,
                "created_at": now,
            }
        return {
            "id": f"w_tot{next(_serial):06d}",
            "job_id": job_id,
            "status": "PENDING",
            "worker_index": next(serial),
            "depth": 0,
            "agent": "simulated",
            "holds_slot": False,
            "log_offset": 0,
            "log_lines": 0,
            "created_at": now,
            "updated_at": now,
        }

    first = row()
    await asyncio.to_thread(_insert_bare, settings.database_url, first, listed)
    armed: list[bool] = []

    def commit_one_after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if armed and f"from {listed}" in statement.lower():
            armed.clear()
            thread = threading.Thread(target=_insert_bare, args=(settings.database_url, row(), listed))
            thread.start()
            thread.join()

    async def page() -> tuple[int, int, int]:
        """How many rows the page holds, the total, and how many of them are this test's."""
        async with reader.read_session() as session:
            if listed == "workspaces":
                workspaces, total = await workspaces_repo.list_workspaces(
                    session, ids=None, limit=500, offset=0
                )
                return (
                    len(workspaces),
                    total,
                    len([ws for ws, _, _ in workspaces if ws.root_job_id == job_id]),
                )
            workers, total = await workers_repo.list_workers(session, job_id=job_id, limit=500)
            return len(workers), total, len(workers)

    event.listen(reader.engine.sync_engine, "after_cursor_execute", commit_one_after)
    try:
        for _ in range(3):
            armed[:] = [True]
            rows, total, _ = await page()
            assert not armed, "no row was committed during the read"
            assert min(total, 500) == rows, f"total {total}, page of {rows}"
    finally:
        event.remove(reader.engine.sync_engine, "after_cursor_execute", commit_one_after)
    assert (await page())[2] == 4


def _insert_bare(database_url: str, row: dict[str, Any], table: str = "jobs") -> None:
    """Insert a row (a job's) through a connection that is not SQLAlchemy's at all."""
    import json

    values = {**row, "agent_options": json.dumps(row["agent_options"])} if table == "jobs" else dict(row)
    columns = ", ".join(values)
    if database_url.startswith("sqlite"):
        for name in ("created_at", "updated_at"):
            if name in values:
                values[name] = row[name].strftime("%Y-%m-%d %H:%M:%S.%f")
        conn = sqlite3.connect(database_url.split("///", 1)[1], timeout=60)
        try:
            with conn:
                conn.execute(
                    f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(values))})",
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
            await conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({placeholders})", *values.values())
        finally:
            await conn.close()

    asyncio.run(pg())
