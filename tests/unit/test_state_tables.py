"""The job and worker lifecycles, exhaustively: every (from, to) pair through the real transition
function on a real SQLite database (schema from the real migrations)."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.config import Settings
from orchestrator.core.errors import InvalidTransition, NotFound
from orchestrator.core.ids import new_job_id, new_worker_id
from orchestrator.core.states import (
    JOB_FINAL,
    JOB_TRANSITIONS,
    WORKER_FINAL,
    WORKER_TRANSITIONS,
    JobStatus,
    WorkerStatus,
)
from orchestrator.db.migrate import upgrade_database
from orchestrator.db.models import Event, Job, Worker, utcnow
from orchestrator.db.session import Database
from orchestrator.db.transitions import transition_job, transition_worker

T = TypeVar("T")

# The tables as the issue states them, written out independently of orchestrator.core.states.
EXPECTED_JOB = {
    ("PENDING", "RUNNING"),
    ("PENDING", "FAILED"),
    ("PENDING", "CANCELED"),
    ("RUNNING", "COMPLETED"),
    ("RUNNING", "FAILED"),
    ("RUNNING", "CANCELED"),
}
EXPECTED_WORKER = {
    ("IDLE", "RUNNING"),
    ("IDLE", "FAILED"),
    ("IDLE", "TERMINATED"),
    ("RUNNING", "PAUSED"),
    ("RUNNING", "COMPLETED"),
    ("RUNNING", "FAILED"),
    ("RUNNING", "TERMINATED"),
    ("PAUSED", "RUNNING"),
    ("PAUSED", "COMPLETED"),
    ("PAUSED", "FAILED"),
    ("PAUSED", "TERMINATED"),
}
JOB_PAIRS = [(a, b) for a in JobStatus for b in JobStatus]
WORKER_PAIRS = [(a, b) for a in WorkerStatus for b in WorkerStatus]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data = tmp_path_factory.mktemp("states")
    settings = Settings(orchestrator_data_dir=data, database_url=f"sqlite:///{data / 'states.db'}")

    async def _create() -> None:
        database = Database(settings)
        try:
            await upgrade_database(database)
        finally:
            await database.dispose()

    asyncio.run(_create())
    return settings


def run(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    async def _run() -> T:
        database = Database(settings)
        try:
            return await work(database)
        finally:
            await database.dispose()

    return asyncio.run(_run())


def _job(status: str) -> Job:
    job_id = new_job_id()
    now = utcnow()
    return Job(
        id=job_id,
        status=status,
        task_description="state table",
        worker_count=1,
        depth=0,
        path=f"{job_id}/",
        agent="simulated",
        agent_options={},
        created_by="test",
        created_at=now,
        updated_at=now,
    )


async def seed_job(database: Database, status: str) -> str:
    async with database.session() as session:
        job = _job(status)
        session.add(job)
        return job.id


async def seed_worker(database: Database, status: str) -> tuple[str, str]:
    async with database.session() as session:
        job = _job("RUNNING")
        session.add(job)
        await session.flush()
        worker = Worker(
            id=new_worker_id(),
            job_id=job.id,
            status=status,
            worker_index=0,
            depth=0,
            agent="simulated",
            created_at=utcnow(),
            updated_at=utcnow(),
        )
        session.add(worker)
        return job.id, worker.id


async def events_of(session: AsyncSession, job_id: str) -> list[tuple[str | None, str | None, str | None]]:
    rows = await session.execute(
        select(Event.worker_id, Event.from_status, Event.to_status)
        .where(Event.job_id == job_id)
        .order_by(Event.id)
    )
    return [(w, f, t) for w, f, t in rows]


def test_tables_match_the_issue() -> None:
    assert {(a.value, b.value) for a in JobStatus for b in JOB_TRANSITIONS[a]} == EXPECTED_JOB
    assert {(a.value, b.value) for a in WorkerStatus for b in WORKER_TRANSITIONS[a]} == EXPECTED_WORKER
    assert {s.value for s in JOB_FINAL} == {"COMPLETED", "FAILED", "CANCELED"}
    assert {s.value for s in WORKER_FINAL} == {"COMPLETED", "FAILED", "TERMINATED"}


@pytest.mark.parametrize(("current", "target"), JOB_PAIRS, ids=[f"{a}->{b}" for a, b in JOB_PAIRS])
def test_job_transition(settings: Settings, current: JobStatus, target: JobStatus) -> None:
    allowed = (current.value, target.value) in EXPECTED_JOB

    async def scenario(database: Database) -> None:
        job_id = await seed_job(database, current.value)
        error: InvalidTransition | None = None
        try:
            async with database.session() as session:
                changed = await transition_job(session, job_id, target, actor="test", reason="why")
                assert changed.status == target.value
        except InvalidTransition as exc:
            error = exc
        async with database.session() as session:
            job = (await session.execute(select(Job).where(Job.id == job_id))).scalar_one()
            events = await events_of(session, job_id)
        if allowed:
            assert error is None
            assert job.status == target.value
            assert job.status_reason == "why"
            assert events == [(None, current.value, target.value)]
            assert (job.finished_at is not None) == (target in JOB_FINAL)
            assert (job.started_at is not None) == (target is JobStatus.RUNNING)
        else:
            assert error is not None, f"{current} -> {target} must be refused"
            assert error.status_code == 400
            assert (error.current, error.target) == (current.value, target.value)
            assert (
                str(error) == f"Invalid state transition for job {job_id}: {current.value} -> {target.value}"
            )
            assert job.status == current.value
            assert events == []

    run(settings, scenario)


@pytest.mark.parametrize(("current", "target"), WORKER_PAIRS, ids=[f"{a}->{b}" for a, b in WORKER_PAIRS])
def test_worker_transition(settings: Settings, current: WorkerStatus, target: WorkerStatus) -> None:
    allowed = (current.value, target.value) in EXPECTED_WORKER

    async def scenario(database: Database) -> None:
        job_id, worker_id = await seed_worker(database, current.value)
        error: InvalidTransition | None = None
        try:
            async with database.session() as session:
                changed = await transition_worker(
                    session, worker_id, target, actor="test", values={"exit_code": 7}
                )
                assert changed.status == target.value
        except InvalidTransition as exc:
            error = exc
        async with database.session() as session:
            worker = (await session.execute(select(Worker).where(Worker.id == worker_id))).scalar_one()
            events = await events_of(session, job_id)
        if allowed:
            assert error is None
            assert worker.status == target.value and worker.exit_code == 7
            assert events == [(worker_id, current.value, target.value)]
            assert (worker.finished_at is not None) == (target in WORKER_FINAL)
        else:
            assert error is not None, f"{current} -> {target} must be refused"
            assert (error.current, error.target) == (current.value, target.value)
            assert f"{current.value} -> {target.value}" in str(error) and worker_id in str(error)
            assert worker.status == current.value and worker.exit_code is None
            assert events == []

    run(settings, scenario)


def test_unknown_entities_are_not_found(settings: Settings) -> None:
    async def scenario(database: Database) -> None:
        async with database.session() as session:
            with pytest.raises(NotFound):
                await transition_job(session, "j_000000000000", JobStatus.RUNNING, actor="test")
            with pytest.raises(NotFound):
                await transition_worker(session, "w_000000000000", WorkerStatus.RUNNING, actor="test")

    run(settings, scenario)


def test_the_conditional_update_loses_to_a_change_made_after_the_read(settings: Settings) -> None:
    """Session B has read PENDING; before its UPDATE runs, another writer makes the job CANCELED.
    B's `UPDATE ... WHERE status = 'PENDING'` must then change nothing and B must fail naming both
    the state it found and the one it wanted; no event of B's survives."""

    async def scenario(database: Database) -> None:
        job_id = await seed_job(database, "PENDING")
        interfered: list[str] = []

        def before_update(conn: Connection, cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith("UPDATE JOBS") and not interfered:
                interfered.append(statement)
                cursor.execute("UPDATE jobs SET status = 'CANCELED' WHERE id = ?", (job_id,))

        with pytest.raises(InvalidTransition) as caught:
            async with database.session() as session:
                conn = await session.connection()
                event.listen(conn.sync_connection, "before_cursor_execute", before_update)
                await transition_job(session, job_id, JobStatus.RUNNING, actor="loser")
        assert interfered, "the interfering write did not run"
        assert (caught.value.current, caught.value.target) == ("CANCELED", "RUNNING")
        async with database.session() as session:
            assert await events_of(session, job_id) == []

    run(settings, scenario)


def _race_one(args: tuple[str, str, str, str, Any]) -> str:
    """In its own process: wait for the others, then try one transition. Returns 'won' or 'lost'."""
    url, data_dir, job_id, target, barrier = args
    settings = Settings(orchestrator_data_dir=Path(data_dir), database_url=url)

    async def attempt() -> str:
        database = Database(settings)
        try:
            barrier.wait(30)
            async with database.session() as session:
                await transition_job(session, job_id, JobStatus(target), actor=f"racer-{target}")
            return "won"
        except InvalidTransition:
            return "lost"
        finally:
            await database.dispose()

    return asyncio.run(attempt())


def test_racing_processes_exactly_one_wins(settings: Settings) -> None:
    """Separate processes, separate connections, released together: one transition wins."""
    # Targets that are final from PENDING: whoever comes second finds a state with no way out.
    rounds = [["CANCELED", "CANCELED"], ["CANCELED", "FAILED", "FAILED", "CANCELED"]] * 3
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        for targets in rounds:
            job_id = run(settings, lambda db: seed_job(db, "PENDING"))
            barrier = manager.Barrier(len(targets))
            url, data_dir = settings.database_url, str(settings.orchestrator_data_dir)
            outcomes = pool.map(_race_one, [(url, data_dir, job_id, t, barrier) for t in targets])
            assert sorted(outcomes) == ["lost"] * (len(targets) - 1) + ["won"], outcomes

            async def check(database: Database, job_id: str = job_id) -> None:
                async with database.session() as session:
                    events = await events_of(session, job_id)
                    job = (await session.execute(select(Job).where(Job.id == job_id))).scalar_one()
                assert len(events) == 1 and events[0][1] == "PENDING" and events[0][2] == job.status

            run(settings, check)
