"""The engine's SQL: claiming jobs, engine liveness, and what needs attention."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, case, delete, exists, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.ids import new_worker_id
from orchestrator.core.states import WORKER_LIVE, JobStatus, WorkerStatus
from orchestrator.db.events import record_event
from orchestrator.db.locking import for_update
from orchestrator.db.models import Allocation, EngineRecord, Job, Worker, utcnow

ACTIVE_JOB = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
LIVE = tuple(s.value for s in WORKER_LIVE)


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


async def claim_pending(session: AsyncSession, engine_id: str, limit: int) -> list[Job]:
    """Take unowned PENDING jobs, highest priority first, FIFO within a priority."""
    candidates = (
        select(Job.id)
        .where(Job.status == JobStatus.PENDING.value, Job.engine_id.is_(None))
        .order_by(Job.depth, Job.priority.desc(), Job.created_at)
        .limit(limit)
    )
    ids = list((await session.execute(for_update(session, candidates, skip_locked=True))).scalars())
    if not ids:
        return []
    await session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.engine_id.is_(None))
        .values(engine_id=engine_id)
        .execution_options(synchronize_session=False)
    )
    stmt = (
        select(Job)
        .where(Job.id.in_(ids), Job.engine_id == engine_id)
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars())


async def orphaned_jobs(session: AsyncSession, live_engines: set[str]) -> list[Job]:
    stmt = (
        select(Job)
        .where(Job.status.in_(ACTIVE_JOB), Job.engine_id.is_not(None), Job.engine_id.not_in(live_engines))
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars())


async def take_over_job(session: AsyncSession, job_id: str, old_engine: str | None, engine_id: str) -> bool:
    result = await session.execute(
        update(Job).where(Job.id == job_id, Job.engine_id == old_engine).values(engine_id=engine_id)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def create_workers(session: AsyncSession, jobs: list[Job], actor: str) -> None:
    """The IDLE workers of newly claimed jobs, written in one flush."""
    now = utcnow()
    for job in jobs:
        for index in range(job.worker_count):
            worker_id = new_worker_id()
            session.add(
                Worker(
                    id=worker_id,
                    job_id=job.id,
                    workspace_id=job.workspace_id,
                    status=WorkerStatus.IDLE.value,
                    worker_index=index,
                    depth=job.depth,
                    agent=job.agent,
                    holds_slot=False,
                    log_offset=0,
                    log_lines=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            record_event(
                session,
                job_id=job.id,
                worker_id=worker_id,
                kind="worker.status",
                actor=actor,
                from_status=None,
                to_status=WorkerStatus.IDLE.value,
                reason="created",
                created_at=now,
            )
    await session.flush()


async def idle_workers(
    session: AsyncSession, engine_id: str, per_depth: dict[int, int], limit: int
) -> list[tuple[Worker, Job]]:
    """IDLE workers that could start now, in queue order: at each depth at most `per_depth[d]`
    (its free slots, plus a little for workers the caller skips), and any worker of a job holding
    an unbound slot (an explicit allocation) or holding a slot already. Rows that could not start
    are never loaded: loading them cost more than all the rest of a pass."""
    unbound = exists().where(Allocation.job_id == Job.id, Allocation.slots > Allocation.bound)
    candidates = and_(
        Job.engine_id == engine_id,
        Job.status.in_(ACTIVE_JOB),
        Worker.status == WorkerStatus.IDLE.value,
        Worker.pid.is_(None),
    )
    queue_order = (Job.priority.desc(), Job.created_at, Worker.worker_index)
    ranked = (
        select(
            Worker.id.label("worker_id"),
            func.row_number().over(partition_by=Job.depth, order_by=queue_order).label("place"),
        )
        .join(Job, Job.id == Worker.job_id)
        .where(candidates)
        .subquery()
    )
    allowed = (
        case(
            *((Job.depth == depth, count) for depth, count in sorted(per_depth.items()) if count > 0),
            else_=0,
        )
        if any(count > 0 for count in per_depth.values())
        else literal(0)
    )
    stmt = (
        select(Worker, Job)
        .join(Job, Job.id == Worker.job_id)
        .join(ranked, ranked.c.worker_id == Worker.id)
        .where(or_(ranked.c.place <= allowed, unbound, Worker.holds_slot.is_(True)))
        .order_by(Job.depth, *queue_order)
        .limit(limit)
        .execution_options(populate_existing=True)
    )
    return [(w, j) for w, j in (await session.execute(stmt)).all()]


async def worker_statuses(session: AsyncSession, worker_ids: list[str]) -> dict[str, str]:
    if not worker_ids:
        return {}
    stmt = select(Worker.id, Worker.status).where(Worker.id.in_(worker_ids))
    return {worker_id: status for worker_id, status in (await session.execute(stmt)).all()}


async def workers_for_jobs(session: AsyncSession, job_ids: list[str]) -> list[Worker]:
    stmt = select(Worker).where(Worker.job_id.in_(job_ids)).execution_options(populate_existing=True)
    return list((await session.execute(stmt)).scalars())


async def jobs_without_live_workers(
    session: AsyncSession, engine_id: str, *, lock: bool = False
) -> list[Job]:
    """`lock`: the rows stay as read until the transaction ends (db/locking.py)."""
    live_worker = exists().where(and_(Worker.job_id == Job.id, Worker.status.in_(LIVE)))
    stmt = (
        select(Job)
        .where(Job.engine_id == engine_id, Job.status.in_(ACTIVE_JOB), ~live_worker)
        .execution_options(populate_existing=True)
    )
    if lock:
        stmt = for_update(session, stmt, of=Job)
    return list((await session.execute(stmt)).scalars())


async def children_statuses(session: AsyncSession, parent_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(child id, status) of the children of each of `parent_ids`."""
    stmt = select(Job.parent_job_id, Job.id, Job.status).where(Job.parent_job_id.in_(parent_ids))
    found: dict[str, list[tuple[str, str]]] = {}
    for parent_id, child_id, status in (await session.execute(stmt)).all():
        if parent_id is not None:
            found.setdefault(parent_id, []).append((child_id, status))
    return found


async def workers_by_job(session: AsyncSession, job_ids: list[str]) -> dict[str, list[Worker]]:
    found: dict[str, list[Worker]] = {}
    for worker in sorted(await workers_for_jobs(session, job_ids), key=lambda w: w.worker_index):
        found.setdefault(worker.job_id, []).append(worker)
    return found


async def unbound_slots(session: AsyncSession, job_ids: list[str]) -> dict[str, int]:
    """Slots each job holds that no worker holds (an explicit allocation not used up)."""
    stmt = select(Allocation.job_id, Allocation.slots - Allocation.bound).where(
        Allocation.job_id.in_(job_ids)
    )
    return {job_id: int(free) for job_id, free in (await session.execute(stmt)).all()}


async def jobs_by_id(session: AsyncSession, job_ids: list[str]) -> dict[str, Job]:
    if not job_ids:
        return {}
    stmt = select(Job).where(Job.id.in_(job_ids)).execution_options(populate_existing=True)
    return {job.id: job for job in (await session.execute(stmt)).scalars()}


async def workers_by_id(
    session: AsyncSession, worker_ids: list[str], *, lock: bool = False
) -> dict[str, Worker]:
    """Whole rows; `lock`: held until the transaction ends (db/locking.py)."""
    if not worker_ids:
        return {}
    stmt = select(Worker).where(Worker.id.in_(worker_ids)).execution_options(populate_existing=True)
    if lock:
        stmt = for_update(session, stmt)
    return {worker.id: worker for worker in (await session.execute(stmt)).scalars()}
