"""Submitting a job, in two steps: `prepare` checks what needs no database (before the request
queues for a transaction), `write` checks the rest and adds the rows in a transaction that may
carry other submits too (jobs/group_commit.py).

The checks run in the order they always did, so a request wrong in several ways gets the same
answer: for a root job every check but the base_ref's needs no database and runs in `prepare`;
a child's parent is read (and its tree locked) before its agent, limits and repository are
looked at. `write` raises a DomainError only before it adds anything to the transaction, so a
refused submit leaves nothing behind in a transaction other submits share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest, Conflict, FieldInvalid, Forbidden, NotFound, Unauthorized
from orchestrator.core.ids import new_job_id, new_workspace_id
from orchestrator.core.states import JOB_FINAL, WORKER_LIVE, JobStatus
from orchestrator.db.models import Job, Workspace, utcnow
from orchestrator.db.precompiled import Record
from orchestrator.db.unit_of_work import UnitOfWork
from orchestrator.jobs import budget
from orchestrator.jobs import repository as repo
from orchestrator.jobs.schemas import JobSubmit
from orchestrator.jobs.submit_rows import PendingRows, submitted_job
from orchestrator.workers import repository as workers_repo
from orchestrator.workspaces import refs
from orchestrator.workspaces.git import resolve_repository

# (agent name or None, options) -> (profile name, validated options); raises FieldInvalid.
AgentValidator = Callable[[str | None, dict[str, Any]], tuple[str, dict[str, Any]]]
# (agent, the submitted limits) -> the limits to store; raises BadRequest above the profile's maximum.
LimitsValidator = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Choices:
    """What a submit resolved its agent, options, limits and repository to."""

    agent: str
    options: dict[str, Any]
    limits: dict[str, Any] | None
    repository: str | None


@dataclass
class Draft:
    """A submit that passed the checks needing no database; `write` does the rest."""

    settings: Settings
    actor: Actor
    body: JobSubmit
    validate_agent: AgentValidator
    validate_limits: LimitsValidator | None
    choices: Choices | None = None  # a root job's, made in `prepare`


async def prepare(
    settings: Settings,
    actor: Actor,
    body: JobSubmit,
    validate_agent: AgentValidator,
    validate_limits: LimitsValidator | None = None,
) -> Draft:
    draft = Draft(settings, actor, body, validate_agent, validate_limits)
    quota = settings.quotas[body.depth]
    if body.worker_count > quota:
        raise FieldInvalid(
            "worker_count",
            f"worker_count must be at most {quota}, the quota of depth {body.depth}",
            body.worker_count,
        )
    if body.parent_job_id is None:
        if actor.is_worker:
            raise Forbidden(f"A worker token may only submit children of its own job {actor.worker_job_id}")
        if body.delegation_key is not None:
            raise FieldInvalid(
                "delegation_key", "delegation_key names a child of a parent: give parent_job_id", None
            )
        draft.choices = await _choices(draft, None)
    return draft


async def write(rows: PendingRows, draft: Draft) -> Record:
    """The submit's database checks and its rows, in `rows.session`'s transaction (which other
    submits may share); returns the job as it will be stored."""
    session, body = rows.session, draft.body
    parent: Job | None = None
    if body.parent_job_id is not None:
        await rows.flush()  # its checks read its siblings (keys, budgets): earlier ones included
        parent = await _checked_parent(session, draft, body.parent_job_id)
    choices = draft.choices or await _choices(draft, parent)
    if choices.repository is not None:
        await rows.flush()  # a workspace an earlier submit made for this repository is reused
    base_ref = await _base_ref(session, draft, parent, choices.repository)
    job_id = new_job_id()
    workspace_id, new_workspace = await _workspace_for(session, parent, choices.repository, job_id)
    job = _job_values(draft, parent, choices, base_ref, job_id, workspace_id)
    now = job["created_at"]
    rows.add(job, new_workspace)
    session.record_event(
        job_id=job_id,
        kind="job.status",
        actor=draft.actor.name,
        to_status=JobStatus.PENDING.value,
        reason="submitted",
        created_at=now,
    )
    return submitted_job(job)


def is_plain_root(draft: Draft) -> bool:
    """A root job that `write` would read nothing for (no repository, no base_ref): its rows,
    event and wake-up can be written in one statement (jobs/submit_rows.write_plain_roots)."""
    return draft.choices is not None and draft.choices.repository is None and draft.body.base_ref is None


def plain_root_job(draft: Draft) -> dict[str, Any]:
    """The `JOB_COLUMNS` of a plain root job (`is_plain_root`), in a new workspace of its own:
    what `write` adds for it, without a session."""
    assert draft.choices is not None
    job_id = new_job_id()
    return _job_values(draft, None, draft.choices, None, job_id, new_workspace_id())


def _job_values(
    draft: Draft, parent: Job | None, choices: Choices, base_ref: str | None, job_id: str, workspace_id: str
) -> dict[str, Any]:
    body, now = draft.body, utcnow()
    return {
        "id": job_id,
        "status": JobStatus.PENDING.value,
        "task_description": body.task_description,
        "worker_count": body.worker_count,
        "depth": body.depth,
        "parent_job_id": parent.id if parent else None,
        "path": f"{parent.path if parent else ''}{job_id}/",
        "priority": body.priority,
        "agent": choices.agent,
        "agent_options": choices.options,
        "timeout_seconds": body.timeout_seconds,
        "repository": choices.repository,
        "base_ref": base_ref,
        "workspace_id": workspace_id,
        "created_by": draft.actor.user_id,
        "created_by_worker_id": draft.actor.worker_id,
        "max_cost_usd": body.max_cost_usd,
        "max_turns": body.max_turns if body.max_turns is not None else (parent.max_turns if parent else None),
        "delegation_key": body.delegation_key,
        "limits": choices.limits,
        "created_at": now,
        "updated_at": now,
    }


async def _checked_parent(session: UnitOfWork, draft: Draft, parent_id: str) -> Job:
    """The parent, its tree locked until the transaction ends, if it may take this child."""
    actor, body = draft.actor, draft.body
    parent = await repo.get_job(session, parent_id)
    if parent is None:
        raise NotFound(f"Parent job {parent_id} not found")
    if actor.is_worker and parent.id != actor.worker_job_id:
        raise Forbidden(f"A worker token may only submit children of its own job {actor.worker_job_id}")
    if actor.worker_id is not None:
        await _check_worker_live(session, actor.worker_id)
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
    return parent


async def _check_worker_live(session: UnitOfWork, worker_id: str) -> None:
    """The token's worker is still live in this transaction: the request authenticated in a
    read transaction of its own before the submit queued for this one, and the worker may have
    ended in between."""
    worker = await workers_repo.get_worker(session, worker_id)
    if worker is None or worker.status not in WORKER_LIVE:
        raise Unauthorized(f"Token of worker {worker_id} is no longer valid: the worker has ended")


async def _choices(draft: Draft, parent: Job | None) -> Choices:
    body = draft.body
    agent, options = draft.validate_agent(body.agent, body.agent_options)
    limits = body.limits.model_dump(exclude_none=True) if body.limits is not None else None
    if limits and draft.validate_limits is not None:
        limits = draft.validate_limits(agent, limits)
    repository = body.repository
    if repository is not None:
        try:
            # git runs here (the real git dirs): not in the event loop
            repository = str(await asyncio.to_thread(resolve_repository, draft.settings, repository))
        except OSError as exc:  # e.g. a name too long for the file system
            raise FieldInvalid("repository", f"not a usable path: {exc.strerror}", repository) from exc
    elif parent is not None and parent.repository is not None:
        repository = parent.repository
    return Choices(agent, options, limits or None, repository)


async def _base_ref(
    session: UnitOfWork, draft: Draft, parent: Job | None, repository: str | None
) -> str | None:
    base_ref, actor = draft.body.base_ref, draft.actor
    if parent is not None and repository == parent.repository and base_ref is None and actor.worker_id:
        # A child in its parent's repository starts from the delegating worker's branch.
        delegating = await workers_repo.get_worker(session, actor.worker_id)
        if delegating is not None and delegating.branch:
            base_ref = delegating.branch
    if base_ref is not None:
        await _check_base_ref(session, actor, repository, base_ref)
    return base_ref


async def _check_base_ref(session: UnitOfWork, actor: Actor, repository: str | None, base_ref: str) -> None:
    """base_ref must resolve in the repository (400); a worker may name only its own subtree's
    orchestrator branches (403). The engine checks again when the worker starts."""
    if repository is None:
        raise FieldInvalid("base_ref", "base_ref needs a repository (none given or inherited)", base_ref)

    async def path_of(job_id: str) -> str | None:
        job = await repo.get_job(session, job_id)
        return job.path if job is not None else None

    subtree = actor.subtree_path if actor.is_worker else None
    await refs.resolve_checked(Path(repository), base_ref, subtree=subtree, path_of=path_of)


async def _check_delegation_key(session: UnitOfWork, parent: Job, key: str | None) -> None:
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
    session: UnitOfWork, parent: Job | None, repository: str | None, job_id: str
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
