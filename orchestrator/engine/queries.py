"""The engine's SQL: claiming jobs, engine liveness, and what needs attention."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple, cast

from sqlalchemy import (
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.ids import new_worker_id
from orchestrator.core.states import WORKER_LIVE, JobStatus, WorkerStatus
from orchestrator.db.events import record_event
from orchestrator.db.locking import for_update
from orchestrator.db.models import Allocation, EngineRecord, Job, Worker, utcnow

ACTIVE_JOB = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
LIVE = tuple(s.value for s in WORKER_LIVE)
CLAIM_ALLOCATED = 100  # jobs holding explicitly allocated slots, claimed per pass


class ClaimedJob(NamedTuple):
    """What making a claimed job's workers needs (plain values: ORM objects cost more to load)."""

    id: str
    worker_count: int
    workspace_id: str | None
    depth: int
    agent: str


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


async def claim_pending(session: AsyncSession, engine_id: str, room: dict[int, int]) -> list[ClaimedJob]:
    """Take unowned PENDING jobs that can start soon, highest priority first, FIFO within a
    priority: at each depth at most `room[depth]`, plus any job holding slots of an explicit
    allocation. Jobs that could not start stay unowned, for this engine's next pass or another
    engine, and the engine's own backlog (every pass reads it) stays small."""
    unbound = exists().where(Allocation.job_id == Job.id, Allocation.slots > Allocation.bound)
    pending = and_(Job.status == JobStatus.PENDING.value, Job.engine_id.is_(None))
    order = (Job.priority.desc(), Job.created_at)
    parts = [
        select(Job.id).where(pending, Job.depth == depth).order_by(*order).limit(count)
        for depth, count in sorted(room.items())
        if count > 0
    ]
    parts.append(select(Job.id).where(pending, unbound).order_by(Job.depth, *order).limit(CLAIM_ALLOCATED))
    # One statement for all depths: each part a derived table with its own ORDER BY / LIMIT (and,
    # on PostgreSQL, its own FOR UPDATE SKIP LOCKED, which a sub-SELECT may carry).
    derived = [for_update(session, part, skip_locked=True).subquery() for part in parts]
    candidates = union_all(*(select(table.c.id) for table in derived))
    ids = set((await session.execute(candidates)).scalars())
    if not ids:
        return []
    table = cast(Table, Job.__table__)
    jobs = table.c
    stmt = (
        update(table)
        .where(jobs.id.in_(ids), jobs.engine_id.is_(None))
        .values(engine_id=engine_id)
        .returning(jobs.id, jobs.worker_count, jobs.workspace_id, jobs.depth, jobs.agent)
    )
    return [ClaimedJob(*row) for row in (await session.execute(stmt)).all()]


async def owned_pending_by_depth(session: AsyncSession, engine_id: str) -> dict[int, int]:
    """How many jobs this engine claimed and has not started yet, per depth."""
    stmt = (
        select(Job.depth, func.count())
        .where(Job.engine_id == engine_id, Job.status == JobStatus.PENDING.value)
        .group_by(Job.depth)
    )
    return {depth: int(count) for depth, count in (await session.execute(stmt)).all()}


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


async def create_workers(session: AsyncSession, jobs: list[ClaimedJob], actor: str) -> None:
    """The IDLE workers of newly claimed jobs: one multi-row INSERT (nothing needs them as
    objects in this session; the scheduler reads the IDLE workers it can start)."""
    now = utcnow()
    rows: list[dict[str, object]] = []
    for job in jobs:
        for index in range(job.worker_count):
            worker_id = new_worker_id()
            rows.append(
                {
                    "id": worker_id,
                    "job_id": job.id,
                    "workspace_id": job.workspace_id,
                    "status": WorkerStatus.IDLE.value,
                    "worker_index": index,
                    "depth": job.depth,
                    "agent": job.agent,
                    "holds_slot": False,
                    "log_offset": 0,
                    "log_lines": 0,
                    "cost_usd": 0.0,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "created_at": now,
                    "updated_at": now,
                }
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
    if rows:
        await session.execute(insert(cast(Table, Worker.__table__)), rows)


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
