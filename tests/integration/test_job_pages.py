"""`GET /api/jobs` pages written without a model and remembered per data version
(orchestrator/jobs/pages.py): the same bytes JobList's serializer writes, for every kind of
field, and never a page the database no longer holds, nor another tree's.

Runs on SQLite and on PostgreSQL (TEST_DATABASE).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import TypeAdapter
from sqlalchemy import event, insert, text, update

from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import Forbidden, NotFound
from orchestrator.db.models import Job
from orchestrator.db.session import Database
from orchestrator.jobs import pages, service
from orchestrator.jobs import repository as jobs_repo
from orchestrator.jobs.schemas import JobList, JobOut

_serial = iter(range(10**6))
WEIRD = 'é ü 中文 😀 \u2028\u2029 "quoted" back\\slash \t\n\r \x01\x1f\x7f'


@pytest.fixture
def page_reads(reader: Database) -> Iterator[list[str]]:
    """The statements of the reader's engine that read jobs' rows (not the data version)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "jobs" in statement.lower():
            seen.append(statement)

    event.listen(reader.engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(reader.engine.sync_engine, "before_cursor_execute", record)


def _job(tag: str, **values: Any) -> dict[str, Any]:
    job_id = f"j_pg{tag}{next(_serial):06d}"
    now = datetime.now(UTC)
    return {
        "id": job_id,
        "status": "PENDING",
        "task_description": f"page {tag}",
        "worker_count": 1,
        "depth": 0,
        "path": f"{job_id}/",
        "priority": 0,
        "agent": "simulated",
        "agent_options": {},
        "created_by": "test",
        "created_at": now,
        "updated_at": now,
    } | values


async def _add(database: Database, rows: list[dict[str, Any]]) -> list[str]:
    async with database.session() as session:
        await session.execute(insert(Job), rows)
    return [row["id"] for row in rows]


async def _page(database: Database, where: jobs_repo.JobFilter, limit: int = 50, offset: int = 0) -> bytes:
    async with database.read_session() as session:
        return await pages.page_json(session, where, limit=limit, offset=offset)


async def _by_the_model(
    database: Database, where: jobs_repo.JobFilter, limit: int = 50, offset: int = 0
) -> bytes:
    """What the list answered before: JobList validated from the rows, dumped as FastAPI dumps
    a response model (its TypeAdapter's dump_json)."""
    async with database.read_session() as session:
        rows, total = await jobs_repo.list_jobs(session, where, limit=limit, offset=offset)
    jobs = [dict(row._mapping) for row in rows]
    page = JobList.model_validate({"jobs": jobs, "total": total, "limit": limit, "offset": offset})
    return TypeAdapter(JobList).dump_json(page, by_alias=True)


def _every_kind(tag: str) -> list[dict[str, Any]]:
    """Jobs with each kind of value a JobOut field holds: NULLs and values, text beyond ASCII and
    with JSON's escapes, times with and without a fraction, given with and without a zone,
    floats JSON writes with exponents, nested options."""
    plus_five = timezone(timedelta(hours=5, minutes=30))
    parent = _job(tag)
    return [
        parent,
        _job(
            tag,
            task_description=f"page {tag} {WEIRD}",
            status="RUNNING",
            worker_count=7,
            depth=1,
            parent_job_id=parent["id"],
            path=f"{parent['id']}/x{tag}/",
            priority=-1000,
            agent="agent-ü",
            agent_options={"model": WEIRD, "n": [1, 2.5, 1e-7, 1e16, None, True], "deep": {"a": {"b": {}}}},
            timeout_seconds=0.1,
            repository=f"/repos/{WEIRD}",
            base_ref="main",
            workspace_id="ws_1",
            status_reason=WEIRD,
            max_cost_usd=12345678901234567.0,
            max_turns=2**31 - 1,
            limits={"memory_mb": 64, "pids": 8, "network": "none"},
            delegation_key="k:1/a@b+c",
            created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),  # no fraction
            updated_at=datetime(2026, 1, 2, 3, 4, 5, 120000),  # no zone: UTC
            started_at=datetime(2026, 1, 2, 8, 34, 5, 1, tzinfo=plus_five),  # another zone
            finished_at=datetime(2026, 1, 2, 3, 4, 6, 999999, tzinfo=UTC),
        ),
        _job(
            tag, status="COMPLETED", timeout_seconds=3.0, max_cost_usd=1e-7, agent_options={"": ""}, limits={}
        ),
    ]


async def test_a_page_is_byte_for_byte_the_model_s(reader: Database) -> None:
    await _add(reader, _every_kind("kinds"))
    for where in (
        jobs_repo.JobFilter(q="page kinds"),
        jobs_repo.JobFilter(q="page kinds", status="RUNNING"),
        jobs_repo.JobFilter(q="no such job"),
    ):
        for limit, offset in ((50, 0), (1, 1), (2, 5)):
            expected = await _by_the_model(reader, where, limit, offset)
            assert await _page(reader, where, limit, offset) == expected  # read
            assert await _page(reader, where, limit, offset) == expected  # remembered
    full = await _page(reader, jobs_repo.JobFilter(q="page kinds"))
    for written in (
        b'"2026-01-02T03:04:05Z"',
        b'"2026-01-02T03:04:05.120000Z"',
        b'"2026-01-02T03:04:05.000001Z"',
    ):
        assert written in full, written


async def test_a_job_is_byte_for_byte_the_model_s(reader: Database) -> None:
    """`GET /api/jobs/{id}`'s body (pages.job_json) is what JobOut's serializer wrote of the
    ORM job, for every kind of field; a job outside a worker's tree or not there is refused as
    before."""
    ids = await _add(reader, _every_kind("single"))
    user = Actor(name="user:u", user_id="u")
    for job_id in ids:
        async with reader.read_session() as session:
            job = await service.get_visible_job(session, user, job_id)
            expected = TypeAdapter(JobOut).dump_json(JobOut.model_validate(job))
            assert await pages.job_json(session, user, job_id) == expected
    worker = Actor(name="worker:w", user_id="u", worker_id="w", worker_job_id="j_x", subtree_path="j_x/")
    async with reader.read_session() as session:
        with pytest.raises(Forbidden, match="outside this token's job subtree"):
            await pages.job_json(session, worker, ids[0])
        for missing in ("j_nothere", "j_\x00nul"):
            with pytest.raises(NotFound, match="not found"):
                await pages.job_json(session, user, missing)


async def test_times_sqlite_holds_in_another_form_are_written_as_the_model_writes_them(
    reader: Database,
) -> None:
    """SQLite text not in the form this server writes (a bare second, a `T`, an offset: another
    program's rows) is parsed, as the model's path parses it."""
    ids = await _add(reader, [_job("forms") for _ in range(3)])
    if reader.is_postgres:
        pytest.skip("PostgreSQL keeps times as timestamps, not text")
    async with reader.session() as session:
        for job_id, form in zip(
            ids, ("2026-03-04 05:06:07", "2026-03-04T05:06:07.5", "2026-03-04 05:06:07+00:00"), strict=True
        ):
            await session.execute(
                text("UPDATE jobs SET started_at = :t WHERE id = :id"), {"t": form, "id": job_id}
            )
    where = jobs_repo.JobFilter(q="page forms")
    assert await _page(reader, where) == await _by_the_model(reader, where)


async def test_an_unchanged_database_answers_the_remembered_page(
    reader: Database, page_reads: list[str]
) -> None:
    """On PostgreSQL the data version is the cluster's snapshot, which any commit in any database
    of the cluster moves (other tests' included): a round counts only if no commit came between
    its first and last statement; one such round must show no read of the page."""
    await _add(reader, [_job("same") for _ in range(3)])
    where = jobs_repo.JobFilter(q="page same")
    first = await _page(reader, where)
    for _ in range(200):
        before = await _snapshot(reader)
        assert await _page(reader, where) == first  # read again if a commit came since the last
        reads = len(page_reads)
        for _ in range(3):
            assert await _page(reader, where) == first
        if not reader.is_postgres or await _snapshot(reader) == before:
            assert len(page_reads) == reads, "an unchanged page was read again"
            return
    pytest.fail("no round of 3 pages without a commit elsewhere in the cluster in 200 tries")


async def _snapshot(database: Database) -> str | None:
    if not database.is_postgres:
        return None
    async with database.read_session() as session:
        return str((await session.execute(text("SELECT pg_current_snapshot()::text"))).scalar_one())


def _bare_update(database_url: str, job_id: str, task: str) -> None:
    """Change a job through a connection that is not SQLAlchemy's at all (another program)."""
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(database_url.split("///", 1)[1], timeout=60)
        try:
            with conn:
                conn.execute("UPDATE jobs SET task_description = ? WHERE id = ?", (task, job_id))
        finally:
            conn.close()
        return

    async def pg() -> None:
        import asyncpg

        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute("UPDATE jobs SET task_description = $1 WHERE id = $2", task, job_id)
        finally:
            await conn.close()

    asyncio.run(pg())


async def test_every_commit_anywhere_is_in_the_next_page(
    reader: Database, other: Database, settings: Settings
) -> None:
    [job_id] = await _add(reader, [_job("moves")])
    where = jobs_repo.JobFilter(q="page moves")

    async def task() -> str:
        body = JobList.model_validate_json(await _page(reader, where))
        return body.jobs[0].task_description

    async def each_connection_sees(expected: str) -> None:
        # Several sessions at once hold several pooled connections (SQLite remembers per connection).
        async def one() -> bytes:
            async with reader.read_session() as session:
                await asyncio.sleep(0)
                return await pages.page_json(session, where, limit=50, offset=0)

        for body in await asyncio.gather(*(one() for _ in range(6))):
            assert JobList.model_validate_json(body).jobs[0].task_description == expected

    assert await task() == "page moves"
    await each_connection_sees("page moves")
    async with other.session() as session:  # another pool (another process's API or engine)
        await session.execute(update(Job).where(Job.id == job_id).values(task_description="page moves 2"))
    assert await task() == "page moves 2"
    await each_connection_sees("page moves 2")
    async with reader.session() as session:  # this pool: on SQLite maybe the very connection that read
        await session.execute(update(Job).where(Job.id == job_id).values(task_description="page moves 3"))
    assert await task() == "page moves 3"
    await asyncio.to_thread(_bare_update, settings.database_url, job_id, "page moves 4")  # another program
    assert await task() == "page moves 4"
    await each_connection_sees("page moves 4")
    await _add(other, [_job("moves")])
    assert JobList.model_validate_json(await _page(reader, where)).total == 2


async def test_a_write_not_yet_committed_is_not_in_the_page(reader: Database, other: Database) -> None:
    await _add(reader, [_job("open")])
    where = jobs_repo.JobFilter(q="page open")
    before = await _page(reader, where)
    async with other.session() as session:
        await session.execute(insert(Job), [_job("open")])
        assert await _page(reader, where) == before
    assert JobList.model_validate_json(await _page(reader, where)).total == 2


async def test_a_worker_never_gets_another_tree_s_page(reader: Database) -> None:
    """Two trees listed with the same query by their workers (their tokens confine the filter
    to their subtree): each page holds its own tree only, remembered or not."""
    trees: dict[str, list[str]] = {}
    for name in ("a", "b"):
        root = _job(f"tree{name}")
        child = _job(f"tree{name}", depth=1, parent_job_id=root["id"], path=f"{root['id']}/c{name}/")
        await _add(reader, [root, child])
        trees[root["path"]] = [root["id"], child["id"]]
    for _ in range(3):
        for path, ids in trees.items():
            actor = Actor(
                name=f"worker:w{path[:8]}",
                user_id="u",
                worker_id="w",
                worker_job_id=ids[0],
                subtree_path=path,
            )
            async with reader.read_session() as session:
                body = await service.list_jobs_json(session, actor, jobs_repo.JobFilter(), limit=50, offset=0)
            listed = JobList.model_validate_json(body)
            assert sorted(job.id for job in listed.jobs) == sorted(ids)
            assert listed.total == 2


async def test_a_subtree_is_exactly_the_jobs_under_its_path(reader: Database) -> None:
    """SQLite reads a subtree as a range of the path index as well as a LIKE: neighbours that sort
    next to the path (a sibling whose id extends the root's, `0` after `/`, `.` before it, NUL-free
    text beyond ASCII) are never in it, and every job under it is."""
    root = f"j_sub{next(_serial):06d}"
    inside = [f"{root}/", f"{root}/c/", f"{root}/ü/", f"{root}//", f"{root}/%_/"]
    outside = [f"{root}0/", f"{root}./", f"{root}x/", f"{root}", f"{root}\x7f/", f"{root}ü/"]
    await _add(reader, [_job("sub", path=path) for path in inside + outside])
    body = await _page(reader, jobs_repo.JobFilter(q="page sub", path_prefix=f"{root}/"))
    listed = JobList.model_validate_json(body)
    async with reader.read_session() as session:
        rows, _ = await jobs_repo.list_jobs(session, jobs_repo.JobFilter(q="page sub"), limit=50)
    path_of = {row.id: row.path for row in rows}
    assert sorted(path_of[job.id] for job in listed.jobs) == sorted(inside)
    assert listed.total == len(inside)
