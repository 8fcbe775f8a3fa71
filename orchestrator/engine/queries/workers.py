"""Reads and writes of the workers an engine supervises: their statuses for control, whole rows
for endings and resumes, their output and spend, and what a start or a resume records."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import WorkerStatus
from orchestrator.db import precompiled
from orchestrator.db.locking import for_update
from orchestrator.db.models import Job, Worker, WorkerLog, utcnow
from orchestrator.engine.queries.rows import IDS, WORKER_ROW, WorkerRow

_WORKER_STATUSES = precompiled.Statement(
    select(Worker.id, Worker.status, Job.status).join(Job, Job.id == Worker.job_id).where(Worker.id.in_(IDS))
)
_WORKERS_OF_JOBS = select(Worker).where(Worker.job_id.in_(IDS)).execution_options(populate_existing=True)
_JOBS_BY_ID = select(Job).where(Job.id.in_(IDS)).execution_options(populate_existing=True)
_WORKERS_BY_ID = select(Worker).where(Worker.id.in_(IDS)).execution_options(populate_existing=True)
_EXITING = precompiled.Statement(select(*WORKER_ROW).where(Worker.id.in_(IDS)), lock=True)


async def worker_statuses(session: AsyncSession, worker_ids: list[str]) -> dict[str, tuple[str, str]]:
    """(worker status, its job's status) of each worker."""
    if not worker_ids:
        return {}
    rows = await precompiled.fetch(session, _WORKER_STATUSES, {"ids": worker_ids})
    return {worker_id: (status, job_status) for worker_id, status, job_status in rows}


async def workers_for_jobs(session: AsyncSession, job_ids: list[str]) -> list[Worker]:
    return list((await session.execute(_WORKERS_OF_JOBS, {"ids": job_ids})).scalars())


async def jobs_by_id(session: AsyncSession, job_ids: list[str]) -> dict[str, Job]:
    if not job_ids:
        return {}
    return {job.id: job for job in (await session.execute(_JOBS_BY_ID, {"ids": job_ids})).scalars()}


async def workers_by_id(
    session: AsyncSession, worker_ids: list[str], *, lock: bool = False
) -> dict[str, Worker]:
    """Whole rows; `lock`: held until the transaction ends (db/locking.py)."""
    if not worker_ids:
        return {}
    stmt = for_update(session, _WORKERS_BY_ID) if lock else _WORKERS_BY_ID
    return {worker.id: worker for worker in (await session.execute(stmt, {"ids": worker_ids})).scalars()}


async def exiting_workers(session: AsyncSession, worker_ids: list[str]) -> dict[str, WorkerRow]:
    """The rows of ended workers, locked until the transaction ends (db/locking.py): plain rows,
    all recording an exit needs."""
    if not worker_ids:
        return {}
    return {row.id: row for row in await precompiled.fetch(session, _EXITING, {"ids": worker_ids})}


async def job(session: AsyncSession, job_id: str) -> Job | None:
    return await session.get(Job, job_id)


async def update_worker(session: AsyncSession, worker_id: str, values: dict[str, Any]) -> None:
    """Columns written without a status change (a worker that ended or was stopped meanwhile)."""
    await session.execute(update(Worker).where(Worker.id == worker_id).values(**values))


async def note_waiting(session: AsyncSession, worker_id: str, reason: str) -> None:
    """Why an IDLE worker waits (it may have started or ended meanwhile: then nothing)."""
    await session.execute(
        update(Worker)
        .where(Worker.id == worker_id, Worker.status == WorkerStatus.IDLE.value)
        .values(status_reason=reason)
    )


async def record_resumed(
    session: AsyncSession,
    worker_id: str,
    *,
    pid: int,
    start_time: int,
    engine_id: str,
    host: str,
    result: dict[str, Any],
    reason: str,
) -> None:
    """A parked worker's new process, in place of the one the rate limit ended."""
    await session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(
            pid=pid,
            pid_start_time=start_time,
            engine_id=engine_id,
            host=host,
            result=result,
            exit_code=None,
            status_reason=reason,
            updated_at=utcnow(),
        )
    )


def add_log_lines(
    session: AsyncSession, worker_id: str, job_id: str, first_seq: int, lines: list[str]
) -> None:
    now = utcnow()
    session.add_all(
        WorkerLog(worker_id=worker_id, job_id=job_id, seq=first_seq + i, text=line, created_at=now)
        for i, line in enumerate(lines)
    )


async def advance_log(session: AsyncSession, worker_id: str, offset: int, lines: int) -> None:
    """Where the next read of the worker's output starts: written with the lines it follows."""
    await session.execute(
        update(Worker).where(Worker.id == worker_id).values(log_offset=offset, log_lines=lines)
    )


async def add_spend(
    session: AsyncSession, worker_id: str, cost: float, tokens_in: int, tokens_out: int
) -> None:
    await session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(
            cost_usd=Worker.cost_usd + cost,
            input_tokens=Worker.input_tokens + tokens_in,
            output_tokens=Worker.output_tokens + tokens_out,
        )
    )
