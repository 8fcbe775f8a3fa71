"""Job submission, reading and cancellation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest, FieldInvalid, Forbidden, InvalidTransition, NotFound
from orchestrator.core.ids import new_job_id, new_workspace_id
from orchestrator.core.states import JOB_FINAL, WORKER_LIVE, JobStatus
from orchestrator.db.events import record_event
from orchestrator.db.models import Allocation, Event, Job, Worker, Workspace, utcnow
from orchestrator.db.notify import notify
from orchestrator.db.transitions import transition_job
from orchestrator.jobs import budget
from orchestrator.jobs import repository as repo
from orchestrator.jobs.schemas import JobSubmit, JobUsage, WorkerUsageOut
from orchestrator.resources.service import release_unbound
from orchestrator.workers import repository as workers_repo
from orchestrator.workers.service import request_stop
from orchestrator.workspaces.git import resolve_repository

JOBS_TOPIC = "jobs"

# (agent name or None, options) -> (profile name, validated options); raises FieldInvalid.
AgentValidator = Callable[[str | None, dict[str, Any]], tuple[str, dict[str, Any]]]
# (agent, the submitted limits) -> the limits to store; raises BadRequest above the profile's maximum.
LimitsValidator = Callable[[str, dict[str, Any]], dict[str, Any]]


async def get_visible_job(session: AsyncSession, actor: Actor, job_id: str) -> Job:
    job = await repo.get_job(session, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    if not actor.can_see(job.path):
        raise Forbidden(f"Job {job_id} is outside this token's job subtree")
    return job


async def submit(
    session: AsyncSession,
    settings: Settings,
    actor: Actor,
    body: JobSubmit,
    validate_agent: AgentValidator,
    validate_limits: LimitsValidator | None = None,
) -> Job:
    quota = settings.quotas[body.depth]
    if body.worker_count > quota:
        raise FieldInvalid(
            "worker_count",
            f"worker_count must be at most {quota}, the quota of depth {body.depth}",
            body.worker_count,
        )
    parent: Job | None = None
    if body.parent_job_id is not None:
        parent = await repo.get_job(session, body.parent_job_id)
        if parent is None:
            raise NotFound(f"Parent job {body.parent_job_id} not found")
    if actor.is_worker and (parent is None or parent.id != actor.worker_job_id):
        raise Forbidden(f"A worker token may only submit children of its own job {actor.worker_job_id}")
    if parent is not None:
        if await repo.lock_tree(session, parent):
            parent = await repo.get_job(session, parent.id)  # a cancel that committed meanwhile shows
            assert parent is not None  # jobs are never deleted
        if body.depth != parent.depth + 1:
            raise BadRequest(
                f"A child job's depth must be its parent's depth + 1: parent {parent.id} is at depth "
                f"{parent.depth}, so depth must be {parent.depth + 1}, not {body.depth}"
            )
        await budget.check_child(session, parent, body.max_cost_usd)
        if JobStatus(parent.status) in JOB_FINAL:
            raise BadRequest(f"Parent job {parent.id} is {parent.status}; it cannot take new child jobs")
        if parent.max_turns is not None and (body.max_turns or 0) > parent.max_turns:
            raise FieldInvalid(
                "max_turns",
                f"max_turns must be at most {parent.max_turns}, the max_turns of parent job {parent.id}",
                body.max_turns,
            )

    agent, options = validate_agent(body.agent, body.agent_options)
    limits = body.limits.model_dump(exclude_none=True) if body.limits is not None else None
    if limits and validate_limits is not None:
        limits = validate_limits(agent, limits)

    repository = body.repository
    base_ref = body.base_ref
    if repository is not None:
        try:
            repository = str(resolve_repository(settings, repository))
        except OSError as exc:  # e.g. a name too long for the file system
            raise FieldInvalid("repository", f"not a usable path: {exc.strerror}", repository) from exc
    elif parent is not None and parent.repository is not None:
        repository = parent.repository
    if parent is not None and repository == parent.repository and base_ref is None and actor.worker_id:
        # A child in its parent's repository starts from the delegating worker's branch.
        delegating = await workers_repo.get_worker(session, actor.worker_id)
        if delegating is not None and delegating.branch:
            base_ref = delegating.branch

    job_id = new_job_id()
    workspace_id = await _workspace_for(session, parent, repository, job_id)
    now = utcnow()
    job = Job(
        id=job_id,
        status=JobStatus.PENDING.value,
        task_description=body.task_description,
        worker_count=body.worker_count,
        depth=body.depth,
        parent_job_id=parent.id if parent else None,
        path=f"{parent.path if parent else ''}{job_id}/",
        priority=body.priority,
        agent=agent,
        agent_options=options,
        timeout_seconds=body.timeout_seconds,
        repository=repository,
        base_ref=base_ref,
        workspace_id=workspace_id,
        created_by=actor.user_id,
        created_by_worker_id=actor.worker_id,
        max_cost_usd=body.max_cost_usd,
        max_turns=body.max_turns if body.max_turns is not None else (parent.max_turns if parent else None),
        limits=limits or None,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    await session.flush()
    session.add(Allocation(job_id=job_id, depth=body.depth, slots=0, bound=0, max_slots=body.worker_count))
    record_event(
        session,
        job_id=job_id,
        kind="job.status",
        actor=actor.name,
        from_status=None,
        to_status=JobStatus.PENDING.value,
        reason="submitted",
        created_at=now,
    )
    await session.flush()
    await notify(session, JOBS_TOPIC)
    return job


async def _workspace_for(
    session: AsyncSession, parent: Job | None, repository: str | None, job_id: str
) -> str:
    if parent is not None and parent.workspace_id and parent.repository == repository:
        return parent.workspace_id
    if repository is not None:
        found = (
            await session.execute(select(Workspace.id).where(Workspace.repository == repository).limit(1))
        ).scalar_one_or_none()
        if found is not None:
            return found
    workspace = Workspace(id=new_workspace_id(), repository=repository, root_job_id=job_id)
    session.add(workspace)
    return workspace.id


async def list_jobs(
    session: AsyncSession,
    actor: Actor,
    *,
    depth: int | None,
    status: JobStatus | None,
    parent_job_id: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Job], int]:
    return await repo.list_jobs(
        session,
        depth=depth,
        status=status.value if status else None,
        parent_job_id=parent_job_id,
        path_prefix=actor.subtree_path,
        limit=limit,
        offset=offset,
    )


async def cancel(session: AsyncSession, actor: Actor, job_id: str) -> Job:
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
    await notify(session, JOBS_TOPIC)


async def events(
    session: AsyncSession, actor: Actor, job_id: str, *, after_id: int, limit: int
) -> list[Event]:
    job = await get_visible_job(session, actor, job_id)
    members = await repo.subtree(session, job)
    return await repo.list_events(session, [m.id for m in members], after_id=after_id, limit=limit)


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
