"""Every statement of the integration phase (engine/integrate.py, resolver.py, repository_lock.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db.models import EngineRecord, Integration, Job, RepositoryLock, Worker, utcnow
from orchestrator.workspaces import merge

PENDING, DONE, FAILED = "pending", "done", "failed"


async def repositories_of(session: AsyncSession, job_ids: list[str]) -> dict[str, str]:
    """The repository of each of these jobs that has one."""
    rows = await session.execute(
        select(Job.id, Job.repository).where(Job.id.in_(job_ids), Job.repository.is_not(None))
    )
    return {job_id: str(repository) for job_id, repository in rows.tuples().all()}


async def integrations_of(session: AsyncSession, job_ids: list[str]) -> dict[str, Integration]:
    rows = await session.scalars(select(Integration).where(Integration.job_id.in_(job_ids)))
    return {row.job_id: row for row in rows}


def add_pending(session: AsyncSession, job_id: str, repository: str) -> None:
    session.add(
        Integration(
            job_id=job_id,
            repository=repository,
            status=PENDING,
            branch=merge.result_branch(job_id),
            merged=[],
            conflicts=[],
            attempts=0,
        )
    )


async def repository_of_integration(session: AsyncSession, job_id: str) -> str | None:
    return await session.scalar(select(Integration.repository).where(Integration.job_id == job_id))


async def finish(
    session: AsyncSession,
    job_id: str,
    *,
    commit: str,
    merged: list[dict[str, Any]],
    conflicts: list[dict[str, Any]],
    failure: str | None,
) -> None:
    """A pending integration ends `done` or `failed` (an integration another engine ended stays)."""
    await session.execute(
        update(Integration)
        .where(Integration.job_id == job_id, Integration.status == PENDING)
        .values(
            status=FAILED if failure else DONE,
            commit=commit,
            merged=merged,
            conflicts=conflicts,
            reason=failure,
            updated_at=utcnow(),
        )
    )


async def fail_after_attempts(session: AsyncSession, job_id: str, max_attempts: int, reason: str) -> None:
    await session.execute(
        update(Integration)
        .where(
            Integration.job_id == job_id,
            Integration.status == PENDING,
            Integration.attempts >= max_attempts,
        )
        .values(status=FAILED, reason=reason, updated_at=utcnow())
    )


async def plan_rows(
    session: AsyncSession, job_id: str
) -> tuple[Integration, Job, list[Worker], list[Job], dict[str, Integration]] | None:
    """A pending integration, its job, the job's workers (by index), its children (by creation)
    and the children's integrations; None when there is nothing (left) to do."""
    row = await session.get(Integration, job_id)
    job = await session.get(Job, job_id)
    if row is None or job is None or row.status != PENDING or job.repository is None:
        return None
    workers = list(
        await session.scalars(
            select(Worker).where(Worker.job_id == job_id).order_by(Worker.worker_index, Worker.created_at)
        )
    )
    children = list(
        await session.scalars(select(Job).where(Job.parent_job_id == job_id).order_by(Job.created_at, Job.id))
    )
    child_rows = await integrations_of(session, [c.id for c in children])
    return row, job, workers, children, child_rows


async def next_worker_index(session: AsyncSession, job_id: str) -> int:
    indexes = list(await session.scalars(select(Worker.worker_index).where(Worker.job_id == job_id)))
    return 1 + max(indexes, default=-1)


async def worker_status(session: AsyncSession, worker_id: str) -> str | None:
    return await session.scalar(select(Worker.status).where(Worker.id == worker_id))


async def record_pid(session: AsyncSession, worker_id: str, pid: int, start_time: int | None) -> None:
    await session.execute(
        update(Worker).where(Worker.id == worker_id).values(pid=pid, pid_start_time=start_time)
    )


async def take_repository_row(
    session: AsyncSession, repository: str, engine_id: str, fresh_after: datetime
) -> bool:
    """SQLite: every transaction holds the write lock, so this read-then-write is atomic. A row
    held by an engine whose heartbeat is older than `fresh_after` is taken over."""
    held = await session.get(RepositoryLock, repository)
    if held is not None and held.engine_id != engine_id:
        holder = await session.get(EngineRecord, held.engine_id)
        if holder is not None and holder.heartbeat_at >= fresh_after:
            return False
    if held is None:
        session.add(RepositoryLock(repository=repository, engine_id=engine_id, acquired_at=utcnow()))
    else:
        held.engine_id, held.acquired_at = engine_id, utcnow()
    return True


async def release_repository_row(session: AsyncSession, repository: str, engine_id: str) -> None:
    await session.execute(
        delete(RepositoryLock).where(
            RepositoryLock.repository == repository, RepositoryLock.engine_id == engine_id
        )
    )
