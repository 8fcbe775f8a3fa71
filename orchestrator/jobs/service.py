"""Job submission, reading and cancellation."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import FieldInvalid, Forbidden, InvalidTransition
from orchestrator.core.states import JOB_FINAL, WORKER_LIVE, JobStatus
from orchestrator.db.lookups import get_visible_job as get_visible_job
from orchestrator.db.models import Job, Worker
from orchestrator.db.precompiled import Record
from orchestrator.db.topics import Topic
from orchestrator.db.transitions import transition_job
from orchestrator.db.unit_of_work import UnitOfWork, unit_of_work
from orchestrator.jobs import budget, pages
from orchestrator.jobs import repository as repo
from orchestrator.jobs.group_commit import SubmitQueue
from orchestrator.jobs.schemas import JobSubmit, JobUsage, WorkerUsageOut
from orchestrator.jobs.submit import AgentValidator, LimitsValidator, prepare, write
from orchestrator.jobs.submit_rows import PendingRows
from orchestrator.resources.service import release_unbound
from orchestrator.workers import repository as workers_repo
from orchestrator.workers.service import request_stop


async def submit(
    session: UnitOfWork,
    settings: Settings,
    actor: Actor,
    body: JobSubmit,
    validate_agent: AgentValidator,
    validate_limits: LimitsValidator | None = None,
) -> Record:
    """Submit a job in the caller's transaction (the API's requests go through `submit_grouped`)."""
    draft = await prepare(settings, actor, body, validate_agent, validate_limits)
    rows = PendingRows(session)
    job = await write(rows, draft)
    await rows.flush()
    return job


async def submit_grouped(queue: SubmitQueue, actor: Actor, body: JobSubmit) -> Record:
    """Submit a job in a transaction shared with this process's concurrent submits
    (jobs/group_commit.py); returns once it is committed."""
    draft = await prepare(queue.settings, actor, body, queue.validate_agent, queue.validate_limits)
    return await queue.submit(draft)


async def list_jobs(
    session: AsyncSession, actor: Actor, where: repo.JobFilter, *, limit: int, offset: int
) -> tuple[list[Row[Any]], int]:
    return await repo.list_jobs(session, _visible(actor, where), limit=limit, offset=offset)


async def list_jobs_json(
    session: AsyncSession, actor: Actor, where: repo.JobFilter, *, limit: int, offset: int
) -> bytes:
    """`list_jobs` as the JobList body, JSON bytes (jobs/pages.py)."""
    return await pages.page_json(session, _visible(actor, where), limit=limit, offset=offset)


async def count_jobs(session: AsyncSession, actor: Actor, where: repo.JobFilter) -> dict[str, int]:
    """Visible jobs per status (every status present, zeros included) under `where`."""
    counts = await repo.count_by_status(session, _visible(actor, where))
    return {status.value: counts.get(status.value, 0) for status in JobStatus}


def _visible(actor: Actor, where: repo.JobFilter) -> repo.JobFilter:
    """Confine the filter to the actor's subtree; refuse a time range that cannot hold a job."""
    if where.created_after and where.created_before and where.created_after >= where.created_before:
        raise FieldInvalid(
            "created_before",
            "created_before must be later than created_after",
            where.created_before.isoformat(),
            location="query",
        )
    return replace(where, path_prefix=actor.subtree_path)


async def cancel(session: UnitOfWork, actor: Actor, job_id: str) -> Job:
    """Cancel a job and, depth first, every unfinished descendant; their workers are terminated."""
    job = await get_visible_job(session, actor, job_id)
    if actor.is_worker and job.id == actor.worker_job_id:
        raise Forbidden("A worker token may cancel its sub-jobs, not its own job")
    if await repo.lock_tree(session, job):  # no child can be added unseen now
        job = await get_visible_job(session, actor, job_id)
    if JobStatus(job.status) in JOB_FINAL:
        raise InvalidTransition("job", job.id, job.status, JobStatus.CANCELED.value)
    for member in await repo.subtree(session, job):
        await cancel_one(
            session, actor, member, reason=f"canceled by {actor.name}", strict=member.id == job.id
        )
    canceled = await repo.get_job(session, job_id)
    assert canceled is not None
    return canceled


async def cancel_one(session: AsyncSession, actor: Actor, job: Job, *, reason: str, strict: bool) -> None:
    if JobStatus(job.status) in JOB_FINAL:
        if strict:  # it finished since the caller looked (a concurrent cancel won): that request lost
            raise InvalidTransition("job", job.id, job.status, JobStatus.CANCELED.value)
        return
    for worker in await workers_repo.workers_of_job(session, job.id):
        if worker.status in WORKER_LIVE:
            with contextlib.suppress(InvalidTransition):  # it may have ended meanwhile
                await request_stop(session, worker, actor, reason=reason)
    try:
        await transition_job(session, job.id, JobStatus.CANCELED, actor=actor.name, reason=reason)
    except InvalidTransition:
        if strict:
            raise
        return
    await release_unbound(session, job.id, job.depth)
    await unit_of_work(session).publish(Topic.JOBS)


async def events(
    session: AsyncSession, actor: Actor, job_id: str, *, after_id: int, limit: int
) -> list[Row[Any]]:
    job = await get_visible_job(session, actor, job_id)
    return await repo.subtree_events(session, job, after_id=after_id, limit=limit)


async def usage(session: AsyncSession, actor: Actor, job_id: str) -> JobUsage:
    job = await get_visible_job(session, actor, job_id)
    total = await budget.subtree_usage(session, job.path)
    rows = (
        await session.execute(
            select(Worker)
            .join(Job, Job.id == Worker.job_id)
            .where(Job.path.startswith(job.path, autoescape=True))
            .order_by(Job.depth, Worker.created_at, Worker.worker_index)
        )
    ).scalars()
    state = await budget.remaining(session, job)
    return JobUsage(
        job_id=job.id,
        cost_usd=round(total.cost_usd, 6),
        input_tokens=total.input_tokens,
        output_tokens=total.output_tokens,
        jobs=total.jobs,
        workers=[
            WorkerUsageOut(
                worker_id=w.id,
                job_id=w.job_id,
                status=w.status,
                cost_usd=round(w.cost_usd or 0.0, 6),
                input_tokens=w.input_tokens or 0,
                output_tokens=w.output_tokens or 0,
            )
            for w in rows
        ],
        max_cost_usd=job.max_cost_usd,
        reserved_usd=None if state is None else round(state[2], 6),
        remaining_usd=None if state is None else round(state[0], 6),
        max_turns=job.max_turns,
    )
