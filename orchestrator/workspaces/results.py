"""Reading a job's result: its result branch, what was merged, and its diff against its base."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.errors import BadRequest, Conflict, Forbidden, NotFound
from orchestrator.core.states import WORKER_LIVE
from orchestrator.db.lookups import get_visible_job
from orchestrator.db.models import Integration, Worker
from orchestrator.workspaces import merge
from orchestrator.workspaces.git import GitError
from orchestrator.workspaces.schemas import MergedBranch, MergeIntoWorkerOut, ResultOut

DIFF_DEFAULT_BYTES = 1_000_000
DIFF_MAX_BYTES = 20_000_000

T = TypeVar("T")


async def integration_of(session: AsyncSession, actor: Actor, job_id: str) -> Integration:
    """The job's finished integration: 400 without a repository, 404 before it is integrated."""
    job = await get_visible_job(session, actor, job_id)
    if job.repository is None:
        raise BadRequest(f"Job {job_id} has no repository, so no result branch (submit it with a repository)")
    row = await session.get(Integration, job_id)
    if row is None or row.commit is None or row.status not in ("done", "failed"):
        raise NotFound(
            f"Job {job_id} has no result yet: it is {job.status}; its result branch is written "
            "once every worker and child job has completed"
        )
    return row


async def result(session: AsyncSession, actor: Actor, job_id: str) -> ResultOut:
    row = await integration_of(session, actor, job_id)
    assert row.commit is not None
    summary = merge.Summary("", 0, 0, 0)
    if row.base_commit is not None:
        summary = await _read_result(job_id, row, merge.summarize, row.base_commit, row.commit)
    return ResultOut(
        job_id=job_id,
        status=row.status,
        reason=row.reason,
        repository=row.repository,
        branch=row.branch,
        commit=row.commit,
        base_commit=row.base_commit,
        merged=[MergedBranch.model_validate(m) for m in row.merged or []],
        conflicts=list(row.conflicts or []),
        attempts=row.attempts,
        **asdict(summary),
    )


async def _read_result(job_id: str, row: Integration, read: Callable[..., T], *args: Any) -> T:
    """`read(repository, *args)` off the event loop: a result whose repository has gone or lost
    its commits is a 404 that says so, not a 500."""
    try:
        return await asyncio.to_thread(read, Path(row.repository), *args)
    except (GitError, OSError) as exc:
        raise NotFound(f"Job {job_id}'s result can no longer be read from {row.repository}: {exc}") from exc


async def diff(
    session: AsyncSession, actor: Actor, job_id: str, path: str | None, limit: int
) -> tuple[str, bool, Integration]:
    """The unified diff of the result against its base (one file with `path`), cut at `limit`."""
    row = await integration_of(session, actor, job_id)
    assert row.commit is not None
    if path is not None and (not path or "\0" in path or path.startswith("/")):
        raise BadRequest("path must be a file path relative to the repository")
    text, cut = await _read_result(
        job_id, row, merge.diff, row.base_commit or row.commit, row.commit, path, limit
    )
    return text, cut, row


async def merge_into_worker(session: AsyncSession, actor: Actor, child_id: str) -> MergeIntoWorkerOut:
    """`merge_subjob`: a worker merges a finished child job's result into its own worktree. Only a
    worker may, only its own children (sub-jobs of its job that it, or nobody in particular,
    spawned), and only once their result branch exists."""
    if actor.worker_id is None or actor.worker_job_id is None:
        raise Forbidden("Only a worker (with its delegated token) can merge a sub-job into its worktree")
    child = await get_visible_job(session, actor, child_id)
    if child.parent_job_id != actor.worker_job_id or child.created_by_worker_id not in (
        None,
        actor.worker_id,
    ):
        raise Forbidden(
            f"Job {child_id} is not a sub-job of this worker; a worker merges only its own sub-jobs"
        )
    worker = await session.get(Worker, actor.worker_id)
    if worker is None or not worker.workdir or not worker.branch or worker.status not in WORKER_LIVE:
        raise BadRequest("This worker has no live git worktree to merge into (its job has no repository)")
    row = await integration_of(session, actor, child_id)
    if row.status != "done" or row.commit is None:
        raise Conflict(f"Job {child_id}'s result is incomplete ({row.reason}); it cannot be merged")
    if Path(row.repository) != Path(child.repository or ""):
        raise BadRequest(f"Job {child_id} works in another repository")
    message = f"orchestrator: merge sub-job {child_id} ({row.branch})"
    try:
        done = await asyncio.to_thread(
            merge.merge_into_worktree,
            Path(row.repository),
            Path(worker.workdir),
            worker.branch,
            row.commit,
            message,
        )
    except (GitError, OSError) as exc:
        raise Conflict(f"Cannot merge {row.branch} into this worktree: {exc}") from exc
    return MergeIntoWorkerOut(job_id=child_id, branch=row.branch, commit=row.commit, **asdict(done))
