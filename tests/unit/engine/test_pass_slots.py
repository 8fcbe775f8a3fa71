"""A pass's bookkeeping as one transaction (on PostgreSQL its statements merged and its slot moves
netted, engine/slots.py): slots come back exactly once, the new ones are taken against what came
back, and a worker stopped while it was being started keeps its stop."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import JobStatus, WorkerStatus
from orchestrator.db.models import Allocation, Event, Job, Worker
from orchestrator.engine.ledger import Ending
from orchestrator.engine.queries import batches, claims
from orchestrator.resources import repository as slots_repo
from tests.unit.engine.conftest import Harness, schedule_and_launch, wait_for


async def _allocations(h: Harness) -> dict[str, tuple[int, int]]:
    rows = await h.in_session(
        lambda s: s.execute(select(Allocation.job_id, Allocation.slots, Allocation.bound))
    )
    return {job_id: (slots, bound) for job_id, slots, bound in rows}


async def test_a_pass_returns_the_ended_slots_once_and_gives_them_to_the_next_jobs(harness: Harness) -> None:
    engine = harness.engine
    first = [await harness.submit(agent="true") for _ in range(2)]
    second = [await harness.submit(agent="sleep") for _ in range(2)]
    await schedule_and_launch(harness)  # the depth-0 quota is 2: the two `true` jobs
    await wait_for(lambda: len(engine.sup.exited) == 2, "both processes to exit")
    batch, engine.sup.exited = engine.sup.exited, []
    endings = await engine.ledger.collect_exits(batch)

    # One pass: the exits recorded, their jobs settled, their two slots given to the next jobs.
    ready = await engine._record_and_schedule([], endings)
    engine.sup.forget(batch)

    assert sorted(job.id for _, job in ready) == sorted(second)
    assert await harness.in_session(lambda s: slots_repo.pools_free(s, None)) == {0: 0, 1: 1}
    allocations = await _allocations(harness)
    assert [allocations[job_id] for job_id in first] == [(0, 0)] * 2
    assert [allocations[job_id] for job_id in second] == [(1, 1)] * 2
    for job_id in first:
        assert (await harness.job(job_id)).status == JobStatus.COMPLETED
        (worker,) = await harness.workers(job_id)
        assert (worker.status, worker.holds_slot) == (WorkerStatus.COMPLETED, False)
    holding = await harness.in_session(lambda s: s.scalars(select(Worker.job_id).where(Worker.holds_slot)))
    assert sorted(holding) == sorted(second)

    # The same exits recorded again (a retried pass): no slot comes back twice.
    again = [Ending(e.proc, e.exit_code, e.limit, e.result_patch) for e in endings]
    await harness.in_session(lambda s: engine.ledger.record_exits(s, again, {}))
    assert await harness.in_session(lambda s: slots_repo.pools_free(s, None)) == {0: 0, 1: 1}
    assert await _allocations(harness) == allocations


async def test_a_worker_stopped_while_starting_keeps_its_stop_and_its_process_is_recorded(
    harness: Harness,
) -> None:
    engine = harness.engine
    job_id = await harness.submit(agent="sleep")
    ready = await harness.in_session(engine.scheduler.schedule)
    (worker, _job) = ready[0]
    launched = await engine.launcher.launch_all(ready)
    (item,) = launched
    assert item.spawned is not None
    engine.sup.supervise(item.spawned.proc, item.job, offset=0, lines=0, memory_mb=0)
    # The API terminates it between the launch and the pass that records the start.
    await harness.in_session(
        lambda s: s.execute(update(Worker).where(Worker.id == worker.id).values(status="TERMINATED"))
    )

    running = await harness.in_session(lambda s: engine.ledger.record_starts(s, launched))

    assert running == {}
    (stored,) = await harness.workers(job_id)
    assert (stored.status, stored.pid, stored.engine_id) == ("TERMINATED", item.spawned.proc.pid, engine.id)
    # The job's first start is recorded all the same: a process of it ran.
    job = await harness.job(job_id)
    assert (job.status, job.started_at is not None) == (JobStatus.RUNNING, True)
    events = await harness.in_session(
        lambda s: s.scalars(
            select(Event.to_status).where(Event.worker_id == worker.id, Event.to_status == "RUNNING")
        )
    )
    assert list(events) == []


async def test_a_job_holding_allocated_slots_is_claimed_while_its_depth_has_no_room(harness: Harness) -> None:
    """The claim's part for explicitly allocated jobs: such a job is claimed (and on PostgreSQL
    gets its IDLE worker) though its depth has no room, ahead of the queue it sits in; the jobs
    around it stay unowned."""
    engine = harness.engine
    queue = [await harness.submit(agent="sleep") for _ in range(30)]
    allocated = queue[17]

    async def allocate(session: AsyncSession) -> None:  # as POST /api/resources/allocate leaves it
        await session.execute(update(Allocation).where(Allocation.job_id == allocated).values(slots=1))

    await harness.in_session(allocate)

    async def claim(session: AsyncSession) -> list[str]:
        if engine.db.is_postgres:
            await batches.claim(session, engine.id, {0: 0}, claims.CLAIM_ALLOCATED, engine.actor)
        else:
            await claims.claim_pending(session, engine.id, {0: 0})
        return list(await session.scalars(select(Job.id).where(Job.engine_id == engine.id)))

    assert await harness.in_session(claim) == [allocated]
    if engine.db.is_postgres:
        (worker,) = await harness.workers(allocated)
        assert worker.status == WorkerStatus.IDLE
