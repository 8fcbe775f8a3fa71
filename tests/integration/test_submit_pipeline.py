"""PostgreSQL submits (issue 19): plain root submits are written in one statement in autocommit,
a process's next batch does not wait for the previous one's COMMIT (jobs/group_commit.py), and
the other processes are told by a NOTIFY after the commit, not in it (Database.notify_committed)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, func, select, text

from orchestrator.agents.registry import AgentRegistry
from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.ids import new_job_id, new_workspace_id
from orchestrator.db.models import Allocation, Event, Job, Workspace
from orchestrator.db.session import Database
from orchestrator.db.topics import CHANNEL, Topic
from orchestrator.jobs import service
from orchestrator.jobs.group_commit import SubmitQueue
from orchestrator.jobs.schemas import JobSubmit
from orchestrator.jobs.submit_rows import PendingRows, write_plain_roots
from tests.support.servers import test_database_kind as database_kind

pytestmark = pytest.mark.skipif(database_kind() != "postgres", reason="PostgreSQL's autocommit writes")

USER = Actor(name="user:pipeline", user_id="pipeline")
LOCK_KEY = 4242


def _queue(settings: Settings, database: Database) -> SubmitQueue:
    agents = AgentRegistry.from_settings(settings)
    return SubmitQueue(database, settings, agents.validate, agents.validate_limits)


def _submit(queue: SubmitQueue, task: str) -> Any:
    return service.submit_grouped(queue, USER, JobSubmit(task_description=task))


async def test_root_submits_are_one_statement_without_begin_or_commit(settings: Settings) -> None:
    database = Database(settings)
    queue = _queue(settings, database)
    sent: list[str] = []  # what this process's connections sent to the server, BEGIN and COMMIT included

    def log_queries(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(lambda query: sent.append(query.query))

    event.listen(database.engine.sync_engine, "connect", log_queries)
    executed: list[str] = []  # the statements SQLAlchemy ran (asyncpg logs only some of them)
    event.listen(
        database.engine.sync_engine,
        "before_cursor_execute",
        lambda _connection, _cursor, statement, *_: executed.append(statement),
    )
    notified: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        await listener.add_listener(CHANNEL, lambda *args: notified.put_nowait(args[3]))
        answers = await asyncio.gather(*(_submit(queue, f"root {i}") for i in range(8)))
        assert queue.transactions == 1  # all eight queued before the writer first ran
        assert await asyncio.wait_for(notified.get(), 60) == "jobs"
        # The rows in one statement, with no NOTIFY (that came after the commit, in a
        # transaction of its own), and no BEGIN or COMMIT on the wire.
        writes = [statement for statement in executed if "INSERT INTO" in statement]
        assert len(writes) == 1 and writes[0].split()[0] == "WITH", executed
        assert all(table in writes[0] for table in ("jobs", "allocations", "workspaces", "events"))
        assert "pg_notify" not in writes[0]
        assert not [query for query in sent if query.split()[0].upper() in ("BEGIN", "START", "COMMIT")], sent

        ids = [answer.id for answer in answers]
        async with database.read_session() as session:
            jobs = (await session.execute(select(Job).where(Job.id.in_(ids)))).scalars().all()
            allocations = (
                await session.execute(select(func.count()).where(Allocation.job_id.in_(ids)))
            ).scalar_one()
            workspaces = (
                await session.execute(select(func.count()).where(Workspace.root_job_id.in_(ids)))
            ).scalar_one()
            events = (await session.execute(select(Event).where(Event.job_id.in_(ids)))).scalars().all()
        assert sorted(job.id for job in jobs) == sorted(ids) and allocations == workspaces == 8
        assert all(job.status == "PENDING" and job.created_by == "pipeline" for job in jobs)
        assert sorted((e.job_id, e.kind, e.actor, e.to_status, e.reason) for e in events) == sorted(
            (i, "job.status", USER.name, "PENDING", "submitted") for i in ids
        )
        created = {job.id: job.created_at for job in jobs}
        assert all(e.created_at == created[e.job_id] for e in events)
    finally:
        await listener.close()
        await database.dispose()


async def test_a_batch_stuck_in_its_statement_does_not_hold_up_the_next(settings: Settings) -> None:
    """A batch whose statement waits (here on a lock a trigger takes) has handed the queue on:
    the submits after it are written and answered meanwhile, each once."""
    database = Database(settings)
    queue = _queue(settings, database)
    holder = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        await holder.execute(
            "CREATE OR REPLACE FUNCTION hold_submit() RETURNS trigger AS $$ BEGIN "
            f"IF NEW.task_description = 'held' THEN PERFORM pg_advisory_xact_lock_shared({LOCK_KEY}); END IF; "
            "RETURN NEW; END $$ LANGUAGE plpgsql;"
            "DROP TRIGGER IF EXISTS hold_submit ON jobs;"
            "CREATE TRIGGER hold_submit BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION hold_submit()"
        )
        await holder.execute(f"SELECT pg_advisory_lock({LOCK_KEY})")
        held = asyncio.ensure_future(_submit(queue, "held"))
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        for _ in range(1200):  # until the held batch's statement waits for the lock
            if await holder.fetchval(waiting):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the held submit never reached its lock")
        free = await asyncio.wait_for(asyncio.gather(*(_submit(queue, "free") for _ in range(3))), 120)
        assert not held.done()
        await holder.execute(f"SELECT pg_advisory_unlock({LOCK_KEY})")
        stuck = await asyncio.wait_for(held, 120)
        async with database.read_session() as session:
            stored = (
                await session.execute(select(Job.id).where(Job.task_description.in_(["held", "free"])))
            ).scalars()
            assert sorted(stored) == sorted([stuck.id, *(job.id for job in free)])
    finally:
        await holder.execute("DROP TRIGGER IF EXISTS hold_submit ON jobs")
        await holder.close()
        await database.dispose()


async def test_a_statement_the_server_refuses_is_written_again_job_by_job(settings: Settings) -> None:
    """A plain batch the database refuses (a trigger, as a unique index refuses a key another
    process took) wrote nothing: each submit is written alone, the refused one refused alone."""
    database = Database(settings)
    queue = _queue(settings, database)
    try:
        async with database.session() as session:
            await session.execute(
                text(
                    "CREATE OR REPLACE FUNCTION refuse_bad() RETURNS trigger AS $$ BEGIN "
                    "IF NEW.task_description = 'bad' THEN RAISE EXCEPTION 'refused' "
                    "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            await session.execute(text("DROP TRIGGER IF EXISTS refuse_bad ON jobs"))
            await session.execute(
                text(
                    "CREATE TRIGGER refuse_bad BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION refuse_bad()"
                )
            )
        tasks = ["ok", "bad", "ok", "ok"]
        answers = await asyncio.gather(*(_submit(queue, task) for task in tasks), return_exceptions=True)
        assert [type(a).__name__ for a in answers] == ["Row", "IntegrityError", "Row", "Row"], answers
        assert queue.transactions == 3
        async with database.read_session() as session:
            stored = (await session.execute(select(Job.id).where(Job.task_description == "ok"))).scalars()
            assert sorted(stored) == sorted(a.id for a in answers if not isinstance(a, BaseException))
    finally:
        async with database.session() as session:
            await session.execute(text("DROP TRIGGER IF EXISTS refuse_bad ON jobs"))
        await database.dispose()


async def test_commits_made_while_a_notify_is_under_way_are_told_by_the_next(settings: Settings) -> None:
    """Each commit is told to the listeners by a NOTIFY sent after it; the commits made while one
    is under way share the next, not one each (and a database on its way out sends what it owes)."""
    database = Database(settings)
    notified: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        await listener.add_listener(CHANNEL, lambda *args: notified.put_nowait(args[3]))
        for _ in range(5):  # five commits before the notifier first runs: one NOTIFY
            database.notify_committed(Topic.JOBS)
        assert await asyncio.wait_for(notified.get(), 60) == "jobs"
        database.notify_committed(Topic.JOBS)  # a commit after it was sent: one more
        assert await asyncio.wait_for(notified.get(), 60) == "jobs"
        # Its connection ended by the server while it idled: the next is sent on a new one.
        pid = database._notify_connection.get_server_pid()
        assert await listener.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(1200):
            if not await listener.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                break
            await asyncio.sleep(0.05)
        database.notify_committed(Topic.JOBS)
        assert await asyncio.wait_for(notified.get(), 60) == "jobs"
        database.notify_committed(Topic.CONTROL)
        database.notify_committed(Topic.JOBS)
        await database.dispose()  # waits for the NOTIFY it owes
        told = {await asyncio.wait_for(notified.get(), 60) for _ in range(2)}
        assert told == {"jobs", "control"}
        await listener.execute("SELECT 1")  # a round trip: anything else sent has arrived by now
        assert notified.empty()
    finally:
        await listener.close()
        await database.dispose()


def _root_job(**values: Any) -> dict[str, Any]:
    job_id = new_job_id()
    now = datetime.now(UTC)
    return {
        "id": job_id,
        "status": "PENDING",
        "task_description": "compare",
        "worker_count": 1,
        "depth": 0,
        "parent_job_id": None,
        "path": f"{job_id}/",
        "priority": 0,
        "agent": "simulated",
        "agent_options": {},
        "timeout_seconds": None,
        "repository": None,
        "base_ref": None,
        "workspace_id": new_workspace_id(),
        "created_by": "pipeline",
        "created_by_worker_id": None,
        "max_cost_usd": None,
        "max_turns": None,
        "delegation_key": None,
        "limits": None,
        "created_at": now,
        "updated_at": now,
    } | values


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "task_description": "every field set: 'quotes', \"json\", ünïcode",
            "worker_count": 3,
            "depth": 2,
            "priority": -7,
            "agent_options": {"model": "ü", "flags": [1, 2.5, None, {"a": "b"}]},
            "timeout_seconds": 12.25,
            "created_by_worker_id": "w_abc",
            "max_cost_usd": 0.125,
            "max_turns": 9,
            "delegation_key": "key-1",
            "limits": {"memory_mb": 512, "pids": 64, "network": False},
        },
    ],
)
async def test_a_batch_of_roots_writes_the_rows_a_single_submit_writes(
    settings: Settings, values: dict[str, Any]
) -> None:
    """The one-statement batch (arrays, one per column) writes every column of the job, its
    workspace, allocation and event as the per-submit statements do: compared row by row, as
    the server stores them (JSON as its text, so JSON null and SQL NULL differ)."""
    database = Database(settings)
    try:
        now = datetime.now(UTC)
        alone, batched = (_root_job(**values, created_at=now, updated_at=now) for _ in range(2))
        async with database.session() as session:
            rows = PendingRows(session, notify=False)
            rows.add(alone, new_workspace=True)
            session.record_event(
                job_id=alone["id"],
                kind="job.status",
                actor=USER.name,
                to_status="PENDING",
                reason="submitted",
                created_at=alone["created_at"],
            )
            await rows.flush()
        async with database.autocommit_connection() as connection:
            await write_plain_roots(connection, [(_root_job(), "user:other"), (batched, USER.name)])

        def stored(job: dict[str, Any]) -> dict[str, Any]:
            ids = {job["id"]: "JOB", job["workspace_id"]: "WS", job["path"]: "PATH"}
            return {
                table: [
                    {k: ids.get(v, v) for k, v in row.items() if k != "id" or table != "events"}
                    for row in found
                ]
                for table, found in tables[job["id"]].items()
            }

        tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
        reader = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
        try:
            for job in (alone, batched):
                tables[job["id"]] = {
                    # asyncpg without codecs: JSON as the server's text ("null" is not None)
                    table: [
                        dict(row)
                        for row in await reader.fetch(f"SELECT * FROM {table} WHERE {key} = $1", value)
                    ]
                    for table, key, value in (
                        ("jobs", "id", job["id"]),
                        ("allocations", "job_id", job["id"]),
                        ("workspaces", "id", job["workspace_id"]),
                        ("events", "job_id", job["id"]),
                    )
                }
        finally:
            await reader.close()
        assert stored(batched) == stored(alone)
        assert all(len(found) == 1 for found in tables[batched["id"]].values())
    finally:
        await database.dispose()
