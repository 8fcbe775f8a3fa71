"""All worker and worker-log SQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.ids import has_nul
from orchestrator.db import counts
from orchestrator.db.locking import is_postgres
from orchestrator.db.models import Job, Worker, WorkerLog


async def get_worker(session: AsyncSession, worker_id: str) -> Worker | None:
    if has_nul(worker_id):
        return None
    stmt = select(Worker).where(Worker.id == worker_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_workers(
    session: AsyncSession,
    *,
    workspace_id: str | None = None,
    status: str | None = None,
    job_id: str | None = None,
    path_prefix: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Worker], int]:
    if has_nul(workspace_id, status, job_id, path_prefix):
        return [], 0
    conditions = []
    if workspace_id is not None:
        conditions.append(Worker.workspace_id == workspace_id)
    if status is not None:
        conditions.append(Worker.status == status)
    if job_id is not None:
        conditions.append(Worker.job_id == job_id)
    if path_prefix is not None:
        conditions.append(
            Worker.job_id.in_(select(Job.id).where(Job.path.startswith(path_prefix, autoescape=True)))
        )
    total_of = select(func.count()).select_from(Worker).where(*conditions)
    page = (
        select(Worker)
        .where(*conditions)
        .order_by(*_newest_first(Worker))
        .limit(limit)
        .offset(offset)
        .execution_options(populate_existing=True)
    )
    if is_postgres(session):  # each statement its own snapshot: the page and its total in one
        rows = (await session.execute(counts.counted_entities(Worker, page, total_of, _newest_first))).all()
        return [row[0] for row in rows if row[0] is not None], int(rows[0][-1])
    total = (await session.execute(total_of)).scalar_one()
    return list((await session.execute(page)).scalars()), total


def _newest_first(worker: Any) -> tuple[ColumnElement[Any], ...]:
    return (worker.created_at.desc(), worker.id.desc())


async def workers_of_job(session: AsyncSession, job_id: str) -> list[Worker]:
    stmt = (
        select(Worker)
        .where(Worker.job_id == job_id)
        .order_by(Worker.worker_index)
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars())


async def count_by_status(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(Worker.status, func.count()).group_by(Worker.status))
    return {status: count for status, count in rows}


async def read_logs(session: AsyncSession, worker_id: str, offset: int, limit: int) -> list[WorkerLog]:
    stmt = (
        select(WorkerLog)
        .where(WorkerLog.worker_id == worker_id, WorkerLog.seq >= offset)
        .order_by(WorkerLog.seq)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())
