"""Quotas, allocation and release; shared by the API and the engine."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest, Forbidden, NotFound
from orchestrator.core.states import JOB_FINAL, JobStatus
from orchestrator.db.lookups import get_job
from orchestrator.db.models import Job
from orchestrator.resources import repository as repo
from orchestrator.resources.schemas import DepthUsage, Quota

_MAX_ATTEMPTS = 50


@dataclass(frozen=True)
class Allocated:
    """What an allocate call answers: `granted` is what the job holds for the request (never
    more than requested, than its worker_count or than the quota); `newly_allocated` what this
    call took from the pool (the ledger figure); `held` all the job's slots, `bound_to_workers`
    those its running workers hold."""

    granted: int
    newly_allocated: int
    bound_to_workers: int
    held: int


@dataclass(frozen=True)
class Released:
    released: int
    still_bound: int
    reason: str


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
    job = await get_job(session, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    if depth != job.depth:
        raise BadRequest(f"Job {job_id} is at depth {job.depth}, not {depth}")
    return job


async def allocate(session: AsyncSession, actor: Actor, job_id: str, depth: int, requested: int) -> Allocated:
    """Make the job hold min(requested, its worker_count) slots if the quota allows; idempotent.

    The engine binds slots to a job's workers as soon as it starts them, so by the time a client
    allocates for the job (the guide's Complete Workflow) the slots are usually held already:
    the answer counts them (`granted`), and only what the job still lacks is taken."""
    job = await _job_for_resources(session, actor, job_id, depth)
    if JobStatus(job.status) in JOB_FINAL:
        raise BadRequest(f"Job {job_id} is {job.status}; slots are only allocated to unfinished jobs")
    return await top_up(session, job_id, depth, requested)


async def top_up(session: AsyncSession, job_id: str, depth: int, requested: int) -> Allocated:
    # Both rows are read locked, in the lock order of every slot move (the job's allocation, then
    # the depth's pool): concurrent allocates of one job take turns, so identical requests never
    # both add, and what was read is what the guarded UPDATEs find.
    allocation = await repo.get_allocation(session, job_id, lock=True)
    pool = await repo.get_pool(session, depth, lock=True)
    if allocation is None or pool is None:
        raise NotFound(f"No allocation record for job {job_id} at depth {depth}")
    lacking = min(requested, allocation.max_slots) - allocation.slots
    take = max(0, min(lacking, pool.max_workers - pool.allocated))
    if take > 0 and not (
        await repo.allocation_add(session, job_id, take, held=allocation.slots)
        and await repo.pool_take(session, depth, take)
    ):
        raise repo.SlotsMoved(f"the slots of job {job_id} or of depth {depth} changed under lock")
    held = allocation.slots + take
    return Allocated(
        granted=min(requested, held), newly_allocated=take, bound_to_workers=allocation.bound, held=held
    )


async def release(session: AsyncSession, actor: Actor, job_id: str, depth: int) -> Released:
    """Return the job's slots that no live worker holds; releasing again returns 0. The answer
    says what stays bound to running workers (they return their slots as they end) and why."""
    job = await _job_for_resources(session, actor, job_id, depth)
    released = await release_unbound(session, job_id, depth)
    allocation = await repo.get_allocation(session, job_id)
    bound = allocation.bound if allocation is not None else 0
    return Released(released=released, still_bound=bound, reason=_release_reason(job, released, bound))


def _release_reason(job: Job, released: int, bound: int) -> str:
    if released:
        said = f"returned {released} slot(s) no worker held to the depth-{job.depth} pool"
    else:
        said = "nothing to release"
    if bound:
        return f"{said}; {bound} slot(s) stay bound to the job's running workers until they end"
    if released:
        return said
    if JobStatus(job.status) in JOB_FINAL:
        return f"{said}: the job is {job.status} and its workers returned their slots as they ended"
    return f"{said}: the job holds no slots"


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
