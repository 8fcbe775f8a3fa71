"""Recovery alone: a live engine takes over the jobs of an engine that stopped heartbeating,
adopting the worker process that still runs and recording the one that ended meanwhile."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from orchestrator.core.states import JobStatus, WorkerStatus
from orchestrator.db.models import EngineRecord, utcnow
from orchestrator.engine.queries import engines as engine_queries
from orchestrator.executors.local import read_exit_code
from tests.unit.engine.conftest import (
    Harness,
    close_harness,
    open_harness,
    record_exits,
    schedule_and_launch,
    wait_for,
)


async def _register(harness: Harness) -> None:
    engine = harness.engine
    await harness.in_session(
        lambda s: engine_queries.register_engine(s, engine.id, engine.executor.host, os.getpid())
    )


async def _die(harness: Harness) -> None:
    """The engine stops supervising and its heartbeat goes stale (as after a kill -9)."""
    for record in harness.engine.sup.live.values():
        harness.engine.executor.unwatch(record.proc)
    harness.engine.sup.live.clear()
    lease = harness.settings.orchestrator_engine_lease_seconds
    stale = utcnow() - timedelta(seconds=lease * 10)
    stmt = update(EngineRecord).where(EngineRecord.id == harness.engine.id).values(heartbeat_at=stale)
    await harness.in_session(lambda s: s.execute(stmt))


async def test_a_stale_engines_running_worker_is_adopted_and_its_ended_one_recorded(harness: Harness) -> None:
    await _register(harness)
    running_job = await harness.submit(agent="sleep")
    ended_job = await harness.submit(agent="true")
    launched = await schedule_and_launch(harness)
    assert len(launched) == 2
    by_job = {item.job.id: item for item in launched}
    sleeper = by_job[running_job].spawned
    quick = by_job[ended_job].spawned
    assert sleeper is not None and quick is not None
    # The quick one ends before anyone records its exit: only its wrapper's exit file says how.
    await wait_for(lambda: read_exit_code(quick.proc.run_dir) is not None, "the quick worker's exit file")
    await _die(harness)

    heir = await open_harness(harness.settings)
    try:
        await _register(heir)
        await heir.engine.recovery.reclaim()

        assert (await heir.job(running_job)).engine_id == heir.engine.id
        (worker,) = await heir.workers(running_job)
        assert worker.engine_id == heir.engine.id
        adopted = heir.engine.sup.live[worker.id]
        assert (adopted.proc.pid, adopted.proc.exited) == (sleeper.proc.pid, False)
        ids = await heir.in_session(lambda s: s.scalars(select(EngineRecord.id)))
        assert sorted(ids) == [heir.engine.id]  # the dead engine's record is gone

        assert [p.worker_id for p in heir.engine.sup.exited] == [by_job[ended_job].worker.id]
        await record_exits(heir)
        (ended,) = await heir.workers(ended_job)
        assert (ended.status, ended.exit_code) == (WorkerStatus.COMPLETED, 0)
        assert (await heir.job(ended_job)).status == JobStatus.COMPLETED
    finally:
        await close_harness(heir)


async def test_adopting_a_worker_leaves_the_event_loop_free(harness: Harness) -> None:
    """A cluster executor's adoption asks the worker's node, up to its call timeout when the node
    does not answer, and the API shares the engine's event loop. Here the heir's executor answers
    the adoption and the check of whether the process is stopped only once a callback on the
    event loop has run meanwhile: run on the loop itself, each would wait for it in vain."""
    await _register(harness)
    job_id = await harness.submit(agent="sleep")
    (item,) = await schedule_and_launch(harness)
    await _die(harness)

    heir = await open_harness(harness.settings)
    try:
        await _register(heir)
        loop = asyncio.get_running_loop()
        executor: Any = heir.engine.executor
        answered: list[str] = []

        def needs_the_loop(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
            def answer(*args: Any) -> Any:
                ran = threading.Event()
                loop.call_soon_threadsafe(ran.set)
                answered.append(name if ran.wait(timeout=30) else f"{name}: the event loop was blocked")
                return call(*args)

            return answer

        executor.adopt = needs_the_loop("adopt", executor.adopt)
        executor.process_stopped = needs_the_loop("process_stopped", executor.process_stopped)
        await heir.engine.recovery.reclaim()

        assert answered == ["adopt", "process_stopped"]
        assert (await heir.job(job_id)).engine_id == heir.engine.id
        assert heir.engine.sup.live[item.worker.id].proc.exited is False
    finally:
        await close_harness(heir)


async def test_a_live_engines_jobs_are_left_alone(harness: Harness) -> None:
    await _register(harness)
    job_id = await harness.submit(agent="sleep")
    await schedule_and_launch(harness)
    peer = await open_harness(harness.settings)
    try:
        await _register(peer)
        await peer.engine.recovery.reclaim()
        assert (await peer.job(job_id)).engine_id == harness.engine.id
        assert peer.engine.sup.live == {}
    finally:
        await close_harness(peer)
