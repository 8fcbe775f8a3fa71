"""Recording a pass's starts on PostgreSQL in one statement (queries/postgres.py STARTS) in place of
two locking reads and two batched UPDATEs; the helpers the ledger's other path shares."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from orchestrator.core.states import WORKER_TRANSITIONS, JobStatus, WorkerStatus
from orchestrator.db import precompiled
from orchestrator.db.models import utcnow
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.launcher import Launched
from orchestrator.engine.queries import batches
from orchestrator.engine.queries import workers as worker_queries
from orchestrator.engine.queries.rows import JobRow, WorkerRow
from orchestrator.engine.supervision import EngineContext


def may_start(worker: WorkerRow) -> bool:
    return WorkerStatus.RUNNING in WORKER_TRANSITIONS.get(WorkerStatus(worker.status), frozenset())


def first_starts(started: list[Launched]) -> dict[str, tuple[JobRow, datetime]]:
    """The jobs (read PENDING) whose first worker a pass started, with its earliest start."""
    first: dict[str, tuple[JobRow, datetime]] = {}
    for item in started:
        job, at = item.job, cast(datetime, item.started_at)
        if job.status == JobStatus.PENDING.value:
            earliest = first.get(job.id, (job, at))[1]
            first[job.id] = (job, min(earliest, at))
    return first


def _written(row: Any, values: dict[str, Any]) -> None:
    """Keep a row read by a precompiled statement as written (its columns among `values`)."""
    if isinstance(row, precompiled.Record):
        for key, value in values.items():
            if key in row._fields:
                setattr(row, key, value)
    else:  # an ORM object
        for key, value in values.items():
            set_committed_value(row, key, value)


async def record_starts_at_once(
    ctx: EngineContext, session: AsyncSession, started: list[Launched]
) -> dict[str, WorkerRow]:
    """PostgreSQL: the same changes as the locking reads and batched UPDATEs make, by one
    statement (each row's UPDATE guarded by its status as read; RETURNING says which
    changed). A worker whose status moved meanwhile (terminated while starting) gets its
    process recorded without a status change, as there."""
    values = {item.worker.id: item.values(host=ctx.executor.host, engine_id=ctx.id) for item in started}
    candidates = [item for item in started if may_start(item.worker)]
    first = first_starts(started)
    if not started:
        return {}
    now = utcnow()
    changed, jobs_started = await batches.record_starts(
        session,
        [(item.worker.id, item.worker.status, values[item.worker.id]) for item in candidates],
        {job.id: at for job, at in first.values()},
        engine_id=ctx.id,
        now=now,
    )
    work = unit_of_work(session)
    running: dict[str, WorkerRow] = {}
    for item in started:
        worker = item.worker
        if worker.id not in changed:
            await worker_queries.update_worker(session, worker.id, values[worker.id])
            continue
        work.record_event(
            job_id=worker.job_id,
            worker_id=worker.id,
            kind="worker.status",
            actor=ctx.actor,
            from_status=worker.status,
            to_status=WorkerStatus.RUNNING.value,
            reason="started",
            created_at=now,
        )
        _written(
            worker,
            {**values[worker.id], "status": WorkerStatus.RUNNING.value, "holds_slot": changed[worker.id]},
        )
        running[worker.id] = worker
    for job_id in sorted(jobs_started):
        job, at = first[job_id]
        work.record_event(
            job_id=job_id,
            kind="job.status",
            actor=ctx.actor,
            from_status=job.status,
            to_status=JobStatus.RUNNING.value,
            reason="first worker started",
            created_at=now,
        )
        _written(job, {"status": JobStatus.RUNNING.value, "started_at": at})
    return running
