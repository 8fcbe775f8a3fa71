"""Engine liveness and take-over: the registry of engines, and the jobs and workers a live
engine takes from a dead one."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db.models import EngineRecord, Job, Worker, utcnow
from orchestrator.engine.queries.rows import ACTIVE_JOB


async def register_engine(session: AsyncSession, engine_id: str, host: str, pid: int) -> None:
    now = utcnow()
    session.add(EngineRecord(id=engine_id, host=host, pid=pid, started_at=now, heartbeat_at=now))
    await session.flush()


async def heartbeat(session: AsyncSession, engine_id: str) -> bool:
    result = await session.execute(
        update(EngineRecord).where(EngineRecord.id == engine_id).values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def unregister_engine(session: AsyncSession, engine_id: str) -> None:
    await session.execute(delete(EngineRecord).where(EngineRecord.id == engine_id))


async def list_engines(session: AsyncSession) -> list[EngineRecord]:
    stmt = select(EngineRecord).execution_options(populate_existing=True)
    return list((await session.execute(stmt)).scalars())


async def live_engine_ids(session: AsyncSession, lease: timedelta, now: datetime) -> set[str]:
    stmt = select(EngineRecord.id).where(EngineRecord.heartbeat_at >= now - lease)
    return set((await session.execute(stmt)).scalars())


async def orphaned_jobs(session: AsyncSession, live_engines: set[str]) -> list[Job]:
    """Jobs of dead engines to take over: unfinished ones, and finished ones (a cancel) whose
    workers still hold slots, that is whose processes may still run: a cancel recorded after its
    engine died must still stop them."""
    owned_by_dead = (Job.engine_id.is_not(None), Job.engine_id.not_in(live_engines))
    active = select(Job).where(Job.status.in_(ACTIVE_JOB), *owned_by_dead)
    holding = (
        select(Worker.job_id)
        .join(Job, Job.id == Worker.job_id)
        .where(Worker.holds_slot.is_(True), Job.status.not_in(ACTIVE_JOB), *owned_by_dead)
        .distinct()
    )
    found = list((await session.execute(active.execution_options(populate_existing=True))).scalars())
    ended = [job_id for (job_id,) in (await session.execute(holding)).all()]
    if ended:
        stmt = select(Job).where(Job.id.in_(ended)).execution_options(populate_existing=True)
        found += list((await session.execute(stmt)).scalars())
    return found


async def take_over_job(session: AsyncSession, job_id: str, old_engine: str | None, engine_id: str) -> bool:
    result = await session.execute(
        update(Job).where(Job.id == job_id, Job.engine_id == old_engine).values(engine_id=engine_id)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def take_over_worker(session: AsyncSession, worker_id: str, engine_id: str) -> None:
    await session.execute(update(Worker).where(Worker.id == worker_id).values(engine_id=engine_id))


async def record_found_process(
    session: AsyncSession, worker_id: str, pid: int, start_time: int | None, host: str, run_dir: str
) -> None:
    """A process its dead engine started but never recorded (its wrapper wrote the PID file)."""
    await session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(pid=pid, pid_start_time=start_time, host=host, run_dir=run_dir)
    )
