"""Quotas, allocation and release; shared by the API and the engine."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest, Forbidden, NotFound
from orchestrator.core.states import JOB_FINAL, JobStatus
from orchestrator.db.models import Job
from orchestrator.jobs import repository as jobs_repo
from orchestrator.resources import repository as repo
from orchestrator.resources.schemas import DepthUsage, Quota

_MAX_ATTEMPTS = 50


async def quotas(session: AsyncSession, settings: Settings) -> list[Quota]:
    pools = await repo.list_pools(session, settings.max_depth)
    return [Quota(depth=p.depth, max_workers=p.max_workers) for p in pools]


async def usage(session: AsyncSession, settings: Settings) -> list[DepthUsage]:
    pools = await repo.list_pools(session, settings.max_depth)
    return [
        DepthUsage(
            depth=p.depth,
            allocated=p.allocated,
            available=p.max_workers - p.allocated,
            max_workers=p.max_workers,
        )
        for p in pools
    ]


async def _job_for_resources(session: AsyncSession, actor: Actor, job_id: str, depth: int) -> Job:
    if actor.is_worker:
        raise Forbidden("A worker token cannot manage resources directly")
    job = await jobs_repo.get_job(session, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    if depth != job.depth:
        raise BadRequest(f"Job {job_id} is at depth {job.depth}, not {depth}")
    return job


async def allocate(session: AsyncSession, actor: Actor, job_id: str, depth: int, requested: int) -> int:
    """Grant min(requested, free slots at the depth, what the job still lacks); may be 0."""
    job = await _job_for_resources(session, actor, job_id, depth)
    if JobStatus(job.status) in JOB_FINAL:
        raise BadRequest(f"Job {job_id} is {job.status}; slots are only allocated to unfinished jobs")
    return await take_slots(session, job_id, depth, requested)


async def take_slots(session: AsyncSession, job_id: str, depth: int, requested: int) -> int:
    for _ in range(_MAX_ATTEMPTS):
        allocation = await repo.get_allocation(session, job_id)
        pool = await repo.get_pool(session, depth)
        if allocation is None or pool is None:
            raise NotFound(f"No allocation record for job {job_id} at depth {depth}")
        grant = min(requested, pool.max_workers - pool.allocated, allocation.max_slots - allocation.slots)
        if grant <= 0:
            return 0
        # Lock order everywhere: the job's allocation row, then the depth's pool row (release and
        # worker exit take them in this order too), so concurrent transactions cannot deadlock.
        if not await repo.allocation_add(session, job_id, grant):
            continue  # the job got slots since we read: read again
        if not await repo.pool_take(session, depth, grant):
            # Another transaction took slots since we read: undo our row and read again.
            if not await repo.allocation_remove_unbound(session, job_id, grant):
                raise RuntimeError(f"could not undo a tentative allocation of job {job_id}")
            continue
        return grant
    return 0


async def release(session: AsyncSession, actor: Actor, job_id: str, depth: int) -> int:
    """Return the job's slots that no live worker holds; releasing again returns 0."""
    await _job_for_resources(session, actor, job_id, depth)
    return await release_unbound(session, job_id, depth)


async def release_unbound(session: AsyncSession, job_id: str, depth: int) -> int:
    for _ in range(_MAX_ATTEMPTS):
        allocation = await repo.get_allocation(session, job_id)
        if allocation is None:
            return 0
        free = allocation.slots - allocation.bound
        if free <= 0:
            return 0
        if await repo.allocation_remove_unbound(session, job_id, free):
            await repo.pool_give_back(session, depth, free)
            return free
    return 0


async def bind_unbound_slot(session: AsyncSession, worker_id: str, job_id: str) -> bool:
    """Give a worker one of the slots its job holds unbound (an explicit allocation). New slots
    are taken for a whole engine pass at once (repository.bind_new_slots)."""
    return await repo.allocation_bind(session, job_id) and await repo.worker_mark_holding(session, worker_id)
