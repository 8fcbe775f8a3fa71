"""The engine's batched writes keep the guarantees of the one-row versions, on a real database
(SQLite, or PostgreSQL with TEST_DATABASE=postgres): the transition table, the conditional UPDATE,
one event per change, slots returned exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Text, cast, event, select, update
from sqlalchemy.engine import Connection

from orchestrator.core.config import Settings
from orchestrator.core.errors import InvalidTransition
from orchestrator.core.states import WORKER_FINAL, WORKER_TRANSITIONS, JobStatus, WorkerStatus
from orchestrator.db.models import Allocation, Job, ResourcePool, Worker
from orchestrator.db.session import Database
from orchestrator.db.transitions import Change, StaleBatch, transition_many
from orchestrator.resources import repository as slots
from tests.integration.conftest import sqlite_settings
from tests.unit.test_state_tables import events_of, run, seed_job, seed_worker


async def _worker(database: Database, worker_id: str) -> Worker:
    async with database.session() as session:
        stmt = select(Worker).where(Worker.id == worker_id).execution_options(populate_existing=True)
        return (await session.execute(stmt)).scalar_one()


def test_every_legal_worker_change_in_one_batch(settings: Settings) -> None:
    """All legal (from, to) pairs applied together: each row as if changed alone, one event each."""
    pairs = [(a, b) for a in WorkerStatus for b in WORKER_TRANSITIONS[a]]

    async def scenario(database: Database) -> None:
        seeded = [(await seed_worker(database, current.value), current, target) for current, target in pairs]
        async with database.session() as session:
            known = {
                w.id: w
                for w in (
                    await session.execute(select(Worker).where(Worker.id.in_([s[0][1] for s in seeded])))
                ).scalars()
            }
            changes = [
                Change(known[worker_id], target, f"to {target.value}", values={"exit_code": i})
                for i, ((_, worker_id), _, target) in enumerate(seeded)
            ]
            await transition_many(session, changes, actor="batch")
        for i, ((job_id, worker_id), current, target) in enumerate(seeded):
            worker = await _worker(database, worker_id)
            assert (worker.status, worker.exit_code, worker.status_reason) == (
                target.value,
                i,
                f"to {target.value}",
            )
            assert (worker.finished_at is not None) == (target in WORKER_FINAL)
            async with database.session() as session:
                assert await events_of(session, job_id) == [(worker_id, current.value, target.value)]

    run(settings, scenario)


def test_one_illegal_change_refuses_the_whole_batch(settings: Settings) -> None:
    async def scenario(database: Database) -> None:
        ok_job, ok_worker = await seed_worker(database, "RUNNING")
        bad_job, bad_worker = await seed_worker(database, "COMPLETED")
        with pytest.raises(InvalidTransition) as caught:
            async with database.session() as session:
                rows = (
                    await session.execute(select(Worker).where(Worker.id.in_([ok_worker, bad_worker])))
                ).scalars()
                by_id = {w.id: w for w in rows}
                await transition_many(
                    session,
                    [
                        Change(by_id[ok_worker], WorkerStatus.COMPLETED, "done"),
                        Change(by_id[bad_worker], WorkerStatus.RUNNING, "again"),
                    ],
                    actor="batch",
                )
        assert (caught.value.current, caught.value.target) == ("COMPLETED", "RUNNING")
        assert (await _worker(database, ok_worker)).status == "RUNNING"
        async with database.session() as session:
            assert await events_of(session, ok_job) == [] and await events_of(session, bad_job) == []

    run(settings, scenario)


def test_a_row_changed_after_the_read_fails_the_batch_and_writes_nothing(tmp_path: Path) -> None:
    """A write slips in between the read and the UPDATE: the guard matches one row fewer, the
    batch raises StaleBatch, and the transaction (both rows, events) rolls back. SQLite reports
    executemany row counts, so this is its last line of defence; on PostgreSQL (no row counts for
    executemany) the rows read with FOR UPDATE cannot change before the UPDATE, so there is no
    such window to test, and this test uses SQLite whatever TEST_DATABASE says."""
    settings = sqlite_settings(tmp_path)

    async def scenario(database: Database) -> None:
        first, second = await seed_job(database, "PENDING"), await seed_job(database, "PENDING")
        interfered: list[str] = []

        def before_update(conn: Connection, cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith("UPDATE JOBS") and not interfered:
                interfered.append(statement)
                cursor.execute("UPDATE jobs SET status = 'CANCELED' WHERE id = ?", (second,))

        with pytest.raises(StaleBatch):
            async with database.session() as session:
                conn = await session.connection()
                event.listen(conn.sync_connection, "before_cursor_execute", before_update)
                jobs = (await session.execute(select(Job).where(Job.id.in_([first, second])))).scalars()
                await transition_many(
                    session, [Change(job, JobStatus.RUNNING, "go") for job in jobs], actor="loser"
                )
        assert interfered, "the interfering write did not run"
        async with database.session() as session:
            statuses = dict(
                (await session.execute(select(Job.id, Job.status).where(Job.id.in_([first, second])))).all()
            )
            assert statuses == {first: "PENDING", second: "PENDING"}
            assert await events_of(session, first) == [] and await events_of(session, second) == []

    run(settings, scenario)


_CHANGED_COLUMNS = ("status", "status_reason", "exit_code", "result", "cost_usd", "holds_slot", "finished_at")


async def _as_stored(database: Database, worker_id: str) -> tuple[object, ...]:
    """The changed columns as the database holds them, as text (a JSON null and an SQL NULL
    differ), the worker's id aside."""
    async with database.session() as session:
        columns = [cast(getattr(Worker, name), Text) for name in _CHANGED_COLUMNS]
        row = (await session.execute(select(*columns).where(Worker.id == worker_id))).one()
        return tuple(row)


def test_a_batch_writes_each_row_as_the_same_change_alone_would(settings: Settings) -> None:
    """On PostgreSQL a shape of several rows is one `UPDATE … FROM unnest(arrays)` (one row
    alone is a plain UPDATE): JSON objects, JSON null, floats, booleans and times must come out
    of the arrays exactly as they go in one at a time."""
    shapes: list[dict[str, Any]] = [
        {"exit_code": 0, "result": {"summary": "ok", "n": [1, 2]}, "cost_usd": 0.25, "holds_slot": False},
        {"exit_code": 3, "result": None, "cost_usd": 1.5, "holds_slot": True},
    ]

    async def scenario(database: Database) -> None:
        for values in shapes:
            batch = [(await seed_worker(database, "RUNNING"))[1] for _ in range(3)]
            alone = (await seed_worker(database, "RUNNING"))[1]
            for ids in (batch, [alone]):
                async with database.session() as session:
                    rows = (await session.execute(select(Worker).where(Worker.id.in_(ids)))).scalars()
                    await transition_many(
                        session,
                        [Change(w, WorkerStatus.FAILED, "exit code 3", values=dict(values)) for w in rows],
                        actor="batch",
                    )
            written_alone = await _as_stored(database, alone)
            assert written_alone[0] == "FAILED" and written_alone[-1] is not None
            for worker_id in batch:
                stored = await _as_stored(database, worker_id)
                # The same change at another moment: only the finish time may differ.
                assert stored[:-1] == written_alone[:-1], (values, stored, written_alone)
                assert stored[-1] is not None

    run(settings, scenario)


@pytest.mark.parametrize("size", [1, 3])
def test_a_row_changed_under_a_batch_fails_it_on_either_database(settings: Settings, size: int) -> None:
    """Rows read without a lock, then one changed by another statement before the batch: the
    guard matches one row fewer, the batch raises StaleBatch and its transaction writes nothing.
    SQLite counts an executemany's rows; on PostgreSQL the batch is one statement whose row count
    asyncpg reports (an executemany's it does not), a batch of one row included."""

    async def scenario(database: Database) -> None:
        seeded = [await seed_worker(database, "RUNNING") for _ in range(size)]
        ids = [worker_id for _, worker_id in seeded]
        with pytest.raises(StaleBatch):
            async with database.session() as session:
                rows = list((await session.execute(select(Worker).where(Worker.id.in_(ids)))).scalars())
                await session.execute(
                    update(Worker).where(Worker.id == ids[size // 2]).values(status="PAUSED"),
                    execution_options={"synchronize_session": False},
                )
                await transition_many(
                    session, [Change(w, WorkerStatus.COMPLETED, "done") for w in rows], actor="loser"
                )
        for job_id, worker_id in seeded:
            assert (await _worker(database, worker_id)).status == "RUNNING"
            async with database.session() as session:
                assert await events_of(session, job_id) == []

    run(settings, scenario)


async def _pool(database: Database, depth: int) -> int:
    async with database.session() as session:
        stmt = select(ResourcePool.allocated).where(ResourcePool.depth == depth)
        return int((await session.execute(stmt)).scalar_one())


async def _allocation(database: Database, job_id: str) -> tuple[int, int]:
    async with database.session() as session:
        stmt = select(Allocation.slots, Allocation.bound).where(Allocation.job_id == job_id)
        slots_, bound = (await session.execute(stmt)).one()
        return int(slots_), int(bound)


def test_slots_are_bound_and_returned_in_batches_exactly_once(settings: Settings) -> None:
    async def scenario(database: Database) -> None:
        depth = 4  # quota 2: nobody else in this module uses it
        job_id, worker_a = await seed_worker(database, "RUNNING")
        async with database.session() as session:
            worker_b = Worker(
                id="w_00000000b0b0", job_id=job_id, status="RUNNING", worker_index=1, depth=depth, agent="x"
            )
            session.add(worker_b)
            await session.execute(Worker.__table__.update().where(Worker.id == worker_a).values(depth=depth))
            session.add(Allocation(job_id=job_id, depth=depth, slots=0, bound=0, max_slots=2))
        async with database.session() as session:
            assert (await slots.pools_free(session, [depth]))[depth] == 2
            assert (await slots.allocations_room(session, [job_id]))[job_id] == (0, 2)
            await slots.bind_new_slots(session, depth, {job_id: 2}, [worker_a, "w_00000000b0b0"])
        assert await _pool(database, depth) == 2 and await _allocation(database, job_id) == (2, 2)
        # Asking for more than the quota allows is refused and changes nothing.
        with pytest.raises(slots.SlotsMoved):
            async with database.session() as session:
                await slots.bind_new_slots(session, depth, {job_id: 1}, [worker_a])
        assert await _pool(database, depth) == 2 and await _allocation(database, job_id) == (2, 2)
        pairs = [(worker_a, job_id, depth), ("w_00000000b0b0", job_id, depth)]
        for expected in (2, 0):  # the second release finds nothing to return
            async with database.session() as session:
                assert await slots.workers_release_slots(session, pairs) == expected
            assert await _pool(database, depth) == 0 and await _allocation(database, job_id) == (0, 0)

    run(settings, scenario)
