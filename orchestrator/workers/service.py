"""Supervisor operations. Status is the operator's intent; the engine that owns the worker's
process makes reality follow (signals within the same process at once, elsewhere within a poll)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.errors import Forbidden, NotFound
from orchestrator.core.states import WorkerStatus
from orchestrator.db.lookups import get_job
from orchestrator.db.models import Worker, WorkerLog, utcnow
from orchestrator.db.topics import Topic
from orchestrator.db.transitions import transition_worker
from orchestrator.db.unit_of_work import UnitOfWork, unit_of_work
from orchestrator.workers import repository as repo


async def get_visible_worker(session: AsyncSession, actor: Actor, worker_id: str) -> Worker:
    worker = await repo.get_worker(session, worker_id)
    if worker is None:
        raise NotFound(f"Worker {worker_id} not found")
    if actor.subtree_path is not None:
        job = await get_job(session, worker.job_id)
        if job is None or not actor.can_see(job.path):
            raise Forbidden(f"Worker {worker_id} is outside this token's job subtree")
    return worker


async def list_workers(
    session: AsyncSession,
    actor: Actor,
    *,
    workspace_id: str | None,
    status: WorkerStatus | None,
    job_id: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Worker], int]:
    return await repo.list_workers(
        session,
        workspace_id=workspace_id,
        status=status.value if status else None,
        job_id=job_id,
        path_prefix=actor.subtree_path,
        limit=limit,
        offset=offset,
    )


def _forbid_worker_tokens(actor: Actor) -> None:
    if actor.is_worker:
        raise Forbidden("A worker token cannot control workers")


async def request_stop(
    session: AsyncSession,
    worker: Worker,
    actor: Actor,
    *,
    reason: str,
    target: WorkerStatus = WorkerStatus.TERMINATED,
) -> Worker:
    """Mark a worker stopped; its engine signals the process group and frees the slot on exit."""
    changed = await transition_worker(
        session, worker.id, target, actor=actor.name, reason=reason, values={"stop_requested_at": utcnow()}
    )
    await unit_of_work(session).publish(Topic.CONTROL)
    return changed


async def terminate(session: UnitOfWork, actor: Actor, worker_id: str) -> Worker:
    _forbid_worker_tokens(actor)
    worker = await get_visible_worker(session, actor, worker_id)
    return await request_stop(session, worker, actor, reason=f"terminated by {actor.name}")


async def pause(session: UnitOfWork, actor: Actor, worker_id: str) -> Worker:
    _forbid_worker_tokens(actor)
    await get_visible_worker(session, actor, worker_id)
    worker = await transition_worker(
        session, worker_id, WorkerStatus.PAUSED, actor=actor.name, reason=f"paused by {actor.name}"
    )
    await session.publish(Topic.CONTROL)
    return worker


async def resume(session: UnitOfWork, actor: Actor, worker_id: str) -> Worker:
    _forbid_worker_tokens(actor)
    await get_visible_worker(session, actor, worker_id)
    worker = await transition_worker(
        session, worker_id, WorkerStatus.RUNNING, actor=actor.name, reason=f"resumed by {actor.name}"
    )
    await session.publish(Topic.CONTROL)
    return worker


async def read_logs(
    session: AsyncSession, actor: Actor, worker_id: str, *, offset: int, limit: int
) -> tuple[Worker, list[WorkerLog]]:
    worker = await get_visible_worker(session, actor, worker_id)
    return worker, await repo.read_logs(session, worker_id, offset, limit)


async def metrics(session: AsyncSession) -> tuple[int, dict[WorkerStatus, int]]:
    counts = await repo.count_by_status(session)
    by_status = {status: counts.get(status.value, 0) for status in WorkerStatus}
    return sum(by_status.values()), by_status
