"""Job submission, reading and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import Row, bindparam, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import (
    BadRequest,
    Conflict,
    FieldInvalid,
    Forbidden,
    InvalidTransition,
    NotFound,
)
from orchestrator.core.ids import new_job_id, new_workspace_id
from orchestrator.core.states import JOB_FINAL, WORKER_LIVE, JobStatus
from orchestrator.db import precompiled
from orchestrator.db.locking import is_postgres
from orchestrator.db.lookups import get_visible_job as get_visible_job
from orchestrator.db.models import Allocation, Event, Job, Worker, Workspace, utcnow
from orchestrator.db.topics import CHANNEL, Topic
from orchestrator.db.transitions import transition_job
from orchestrator.db.unit_of_work import UnitOfWork, unit_of_work
from orchestrator.jobs import budget
from orchestrator.jobs import repository as repo
from orchestrator.jobs.schemas import JobSubmit, JobUsage, WorkerUsageOut
from orchestrator.resources.service import release_unbound
from orchestrator.workers import repository as workers_repo
from orchestrator.workers.service import request_stop
from orchestrator.workspaces import refs
from orchestrator.workspaces.git import resolve_repository

_JOB_COLUMNS = (
    "id",
    "status",
    "task_description",
    "worker_count",
    "depth",
    "parent_job_id",
    "path",
    "priority",
    "agent",
    "agent_options",
    "timeout_seconds",
    "repository",
    "base_ref",
    "workspace_id",
    "created_by",
    "created_by_worker_id",
    "max_cost_usd",
    "max_turns",
    "delegation_key",
    "limits",
    "created_at",
    "updated_at",
)
_JOB_ROW = insert(Job).values(
    {name: bindparam(name, type_=Job.__table__.c[name].type) for name in _JOB_COLUMNS}
)
_ALLOCATION_ROW = insert(Allocation).values(
    job_id=bindparam("id", type_=Allocation.__table__.c.job_id.type),
    depth=bindparam("a_depth", type_=Allocation.__table__.c.depth.type),
    slots=0,
    bound=0,
    max_slots=bindparam("a_max_slots", type_=Allocation.__table__.c.max_slots.type),
    updated_at=bindparam("a_updated_at", type_=Allocation.__table__.c.updated_at.type),
)
_WORKSPACE_ROW = insert(Workspace).values(
    id=bindparam("w_id", type_=Workspace.__table__.c.id.type),
    repository=bindparam("w_repository", type_=Workspace.__table__.c.repository.type),
    root_job_id=bindparam("w_root_job_id", type_=Workspace.__table__.c.root_job_id.type),
    created_at=bindparam("w_created_at", type_=Workspace.__table__.c.created_at.type),
)
_INSERT_JOB = precompiled.Statement(_JOB_ROW)
_INSERT_ALLOCATION = precompiled.Statement(_ALLOCATION_ROW)
_INSERT_WORKSPACE = precompiled.Statement(_WORKSPACE_ROW)
# PostgreSQL, by whether the workspace is new: the rows and UnitOfWork.publish's pg_notify in one
# statement (the allocation's foreign key to the job is checked at the statement's end).
_SUBMIT_PG = {
    new_workspace: select(func.pg_notify(bindparam("channel"), bindparam("topic"))).add_cte(
        *([_WORKSPACE_ROW.cte("new_workspace")] if new_workspace else []),
        _JOB_ROW.cte("new_job"),
        _ALLOCATION_ROW.cte("new_allocation"),
    )
    for new_workspace in (False, True)
}

# (agent name or None, options) -> (profile name, validated options); raises FieldInvalid.
AgentValidator = Callable[[str | None, dict[str, Any]], tuple[str, dict[str, Any]]]
# (agent, the submitted limits) -> the limits to store; raises BadRequest above the profile's maximum.
LimitsValidator = Callable[[str, dict[str, Any]], dict[str, Any]]


async def submit(
    session: UnitOfWork,
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
        await _check_delegation_key(session, parent, body.delegation_key)
    elif body.delegation_key is not None:
        raise FieldInvalid(
            "delegation_key", "delegation_key names a child of a parent: give parent_job_id", None
        )

    agent, options = validate_agent(body.agent, body.agent_options)
    limits = body.limits.model_dump(exclude_none=True) if body.limits is not None else None
    if limits and validate_limits is not None:
        limits = validate_limits(agent, limits)

    repository = body.repository
    base_ref = body.base_ref
    if repository is not None:
        try:
            # git runs here (the real git dirs): not in the event loop
            repository = str(await asyncio.to_thread(resolve_repository, settings, repository))
        except OSError as exc:  # e.g. a name too long for the file system
            raise FieldInvalid("repository", f"not a usable path: {exc.strerror}", repository) from exc
    elif parent is not None and parent.repository is not None:
        repository = parent.repository
    if parent is not None and repository == parent.repository and base_ref is None and actor.worker_id:
        # A child in its parent's repository starts from the delegating worker's branch.
        delegating = await workers_repo.get_worker(session, actor.worker_id)
        if delegating is not None and delegating.branch:
            base_ref = delegating.branch
    if base_ref is not None:
        await _check_base_ref(session, actor, repository, base_ref)

    job_id = new_job_id()
    workspace_id, new_workspace = await _workspace_for(session, parent, repository, job_id)
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
        delegation_key=body.delegation_key,
        limits=limits or None,
        created_at=now,
        updated_at=now,
    )
    # The rows go out as precompiled INSERTs (db/precompiled), not through the ORM's unit of work:
    # submit is the API's hottest write, and a flush costs more CPU than the statements. The Job
    # object is the response's source only; it is not added to the session.
    rows: dict[str, Any] = {name: getattr(job, name) for name in _JOB_COLUMNS}
    rows |= {"a_depth": body.depth, "a_max_slots": body.worker_count, "a_updated_at": now}
    rows |= {"w_id": workspace_id, "w_repository": repository, "w_root_job_id": job_id, "w_created_at": now}
    if is_postgres(session):
        # One round trip for the rows and the wake-up: a data-modifying WITH runs every INSERT.
        # Its first insert gives the transaction its id before the event rows take sequence
        # values at commit (UnitOfWork.commit), so that statement is not needed either.
        notice = {"channel": CHANNEL, "topic": Topic.JOBS.value}
        await session.execute(_SUBMIT_PG[new_workspace], rows | notice)
        session.published_by_statement(Topic.JOBS)
    else:
        if new_workspace:
            await precompiled.execute(session, _INSERT_WORKSPACE, rows)
        await precompiled.execute(session, _INSERT_JOB, rows)
        await precompiled.execute(session, _INSERT_ALLOCATION, rows)
    session.record_event(
        job_id=job_id,
        kind="job.status",
        actor=actor.name,
        from_status=None,
        to_status=JobStatus.PENDING.value,
        reason="submitted",
        created_at=now,
    )
    if not is_postgres(session):
        await session.publish(Topic.JOBS)
    return job


async def _check_base_ref(session: AsyncSession, actor: Actor, repository: str | None, base_ref: str) -> None:
    """base_ref must resolve in the repository (400); a worker may name only its own subtree's
    orchestrator branches (403). The engine checks again when the worker starts."""
    if repository is None:
        raise FieldInvalid("base_ref", "base_ref needs a repository (none given or inherited)", base_ref)

    async def path_of(job_id: str) -> str | None:
        job = await repo.get_job(session, job_id)
        return job.path if job is not None else None

    subtree = actor.subtree_path if actor.is_worker else None
    await refs.resolve_checked(Path(repository), base_ref, subtree=subtree, path_of=path_of)


async def _check_delegation_key(session: AsyncSession, parent: Job, key: str | None) -> None:
    """A second submit with the same key under the same parent is refused (the unique index
    refuses it too, for submits that race): the retry of a submit whose answer was lost must find
    the child it made, not make another."""
    if key is None:
        return
    found = await repo.list_jobs(
        session, repo.JobFilter(parent_job_id=parent.id, delegation_key=key), limit=1
    )
    if found[0]:
        raise Conflict(
            f"delegation_key {key!r} is already used by job {found[0][0].id}, a child of {parent.id}"
        )


async def _workspace_for(
    session: AsyncSession, parent: Job | None, repository: str | None, job_id: str
) -> tuple[str, bool]:
    """The workspace of a new job, and whether it is a new one (to be inserted)."""
    if parent is not None and parent.workspace_id and parent.repository == repository:
        return parent.workspace_id, False
    if repository is not None:
        found = (
            await session.execute(select(Workspace.id).where(Workspace.repository == repository).limit(1))
        ).scalar_one_or_none()
        if found is not None:
            return found, False
    return new_workspace_id(), True


async def list_jobs(
    session: AsyncSession, actor: Actor, where: repo.JobFilter, *, limit: int, offset: int
) -> tuple[list[Row[Any]], int]:
    return await repo.list_jobs(session, _visible(actor, where), limit=limit, offset=offset)


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
