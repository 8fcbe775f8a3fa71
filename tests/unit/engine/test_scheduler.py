"""The scheduler alone: it claims and gives slots within each depth's quota, in queue order."""

from __future__ import annotations

from sqlalchemy import func, select

from orchestrator.db.models import Job, Worker
from orchestrator.engine.supervision import IDLE_SLACK
from orchestrator.resources import repository as slots_repo
from tests.unit.engine.conftest import Harness


async def test_it_binds_exactly_the_free_slots_of_the_depth_in_queue_order(harness: Harness) -> None:
    low = [await harness.submit(agent="sleep") for _ in range(3)]
    high = [await harness.submit(agent="sleep", priority=5) for _ in range(2)]
    scheduler = harness.engine.scheduler

    ready = await harness.in_session(scheduler.schedule)

    # The depth-0 quota is 2: the two high-priority jobs, first submitted first.
    assert [job.id for _, job in ready] == high
    assert await harness.in_session(lambda s: slots_repo.pools_free(s, None)) == {0: 0, 1: 1}
    holding = await harness.in_session(
        lambda s: s.scalars(select(Worker.id).where(Worker.holds_slot.is_(True)))
    )
    assert sorted(holding) == sorted(worker.id for worker, _ in ready)
    claimed = await harness.in_session(
        lambda s: s.scalar(select(func.count()).where(Job.engine_id == harness.engine.id))
    )
    assert 2 <= claimed <= 2 + IDLE_SLACK
    assert low  # queued behind, not started

    # Not launched (so not supervised): the next pass offers the same workers again, no more.
    again = await harness.in_session(scheduler.schedule)
    assert sorted(worker.id for worker, _ in again) == sorted(worker.id for worker, _ in ready)
    assert await harness.in_session(lambda s: slots_repo.pools_free(s, None)) == {0: 0, 1: 1}


async def test_a_supervised_worker_is_not_offered_again(harness: Harness) -> None:
    first = await harness.submit(agent="sleep")
    ready = await harness.in_session(harness.engine.scheduler.schedule)
    assert [job.id for _, job in ready] == [first]
    launched = await harness.engine.launcher.launch_all(ready)
    (item,) = launched
    assert item.spawned is not None
    harness.engine.sup.supervise(item.spawned.proc, item.job, offset=0, lines=0, memory_mb=0)
    assert await harness.in_session(harness.engine.scheduler.schedule) == []
