"""What settling reads: the engine's jobs none of whose workers is live, and how their workers
and children ended (three reads for all candidates of a pass, not three per job)."""

from __future__ import annotations

from sqlalchemy import and_, bindparam, exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db import precompiled
from orchestrator.db.models import Allocation, Job, Worker
from orchestrator.engine.queries.rows import ACTIVE_JOB, IDS, LIVE, SettlingJob, WorkerEnding

_ENDINGS_OF_JOBS = precompiled.Statement(
    select(Worker.job_id, Worker.id, Worker.status, Worker.status_reason, Worker.holds_slot)
    .where(Worker.job_id.in_(IDS))
    .order_by(Worker.job_id, Worker.worker_index)
)
_JOBS_WITHOUT_LIVE_WORKERS = precompiled.Statement(
    select(Job.id, Job.status, Job.depth, Job.started_at).where(
        Job.engine_id == bindparam("engine_id"),
        Job.status.in_(ACTIVE_JOB),
        ~exists().where(and_(Worker.job_id == Job.id, Worker.status.in_(LIVE))),
    ),
    lock=True,
    lock_of=Job,
)
_CHILDREN = precompiled.Statement(
    select(Job.parent_job_id, Job.id, Job.status).where(Job.parent_job_id.in_(IDS))
)
_UNBOUND = precompiled.Statement(
    select(Allocation.job_id, Allocation.slots - Allocation.bound).where(Allocation.job_id.in_(IDS))
)


async def jobs_without_live_workers(session: AsyncSession, engine_id: str) -> list[SettlingJob]:
    """The engine's active jobs none of whose workers is live, locked until the transaction ends
    (db/locking.py)."""
    return await precompiled.fetch(session, _JOBS_WITHOUT_LIVE_WORKERS, {"engine_id": engine_id})


async def children_statuses(session: AsyncSession, parent_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(child id, status) of the children of each of `parent_ids`."""
    found: dict[str, list[tuple[str, str]]] = {}
    for parent_id, child_id, status in await precompiled.fetch(session, _CHILDREN, {"ids": parent_ids}):
        if parent_id is not None:
            found.setdefault(parent_id, []).append((child_id, status))
    return found


async def worker_endings(session: AsyncSession, job_ids: list[str]) -> dict[str, list[WorkerEnding]]:
    """How each job's workers stand, in worker order: plain rows, all settling needs (loading
    whole ORM rows cost four times as much per pass)."""
    found: dict[str, list[WorkerEnding]] = {}
    rows = await precompiled.fetch(session, _ENDINGS_OF_JOBS, {"ids": job_ids})
    for job_id, worker_id, status, reason, holds_slot in rows:
        found.setdefault(job_id, []).append(WorkerEnding(worker_id, status, reason, holds_slot))
    return found


async def unbound_slots(session: AsyncSession, job_ids: list[str]) -> dict[str, int]:
    """Slots each job holds that no worker holds (an explicit allocation not used up)."""
    rows = await precompiled.fetch(session, _UNBOUND, {"ids": job_ids})
    return {job_id: int(free) for job_id, free in rows}
