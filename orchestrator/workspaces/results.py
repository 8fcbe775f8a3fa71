"""Reading a job's result: its result branch, what was merged, and its diff against its base."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.errors import BadRequest, Conflict, Forbidden, NotFound
from orchestrator.core.states import WORKER_LIVE, WorkerStatus
from orchestrator.db.locking import for_update
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


class WorkerHold(Protocol):
    """Stops and continues a worker's processes (executors/held.py `CgroupHold`, given by the
    API layer: this package does not import the executors)."""

    def stop(self, worker_id: str) -> str: ...

    def resume(self, worker_id: str) -> None: ...


async def merge_into_worker(
    session: AsyncSession, actor: Actor, child_id: str, hold: WorkerHold
) -> MergeIntoWorkerOut:
    """`merge_subjob`: a worker merges a finished child job's result into its own worktree. Only a
    worker may, only its own children (sub-jobs of its job that it, or nobody in particular,
    spawned), and only once their result branch exists. Git writes the worktree as root: the
    worker is held (every process stopped) meanwhile, so it cannot swap a directory for a link."""
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
    # Locked till the request commits (SQLite: its BEGIN IMMEDIATE): a second merge of this worker
    # waits, so none releases the worker while another merges; a pause commits after the release.
    query = for_update(session, select(Worker).where(Worker.id == actor.worker_id))
    worker = (await session.execute(query)).scalar_one_or_none()
    if worker is None or not worker.workdir or not worker.branch or worker.status not in WORKER_LIVE:
        raise BadRequest("This worker has no live git worktree to merge into (its job has no repository)")
    if worker.status != WorkerStatus.RUNNING:
        raise Conflict(f"This worker is {worker.status}: it is merged into only while it runs")
    row = await integration_of(session, actor, child_id)
    if row.status != "done" or row.commit is None:
        raise Conflict(f"Job {child_id}'s result is incomplete ({row.reason}); it cannot be merged")
    if Path(row.repository) != Path(child.repository or ""):
        raise BadRequest(f"Job {child_id} works in another repository")
    branch, commit = row.branch, row.commit
    args = (Path(row.repository), Path(worker.workdir), worker.branch, commit)
    message = f"orchestrator: merge sub-job {child_id} ({branch})"
    done = await _to_the_end(_merge_held(session, hold, worker.id, branch, *args, message))
    return MergeIntoWorkerOut(job_id=child_id, branch=branch, commit=commit, **asdict(done))


async def _to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """`work` run to its end even if the request is cancelled meanwhile: a cancelled await would
    leave git running in its thread with the worker released, or the worker stopped for good."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    finally:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved (raised above unless this request was cancelled)


async def _merge_held(
    session: AsyncSession, hold: WorkerHold, worker_id: str, branch: str, *args: Any
) -> merge.IntoWorktree:
    """The merge with the worker's processes stopped. A host without cgroups (no sandbox limits
    either) merges as before; a worker whose processes are on another host is refused."""
    held = await asyncio.to_thread(hold.stop, worker_id)
    try:
        if held == "not here":
            raise Conflict(
                "This worker's processes are not on the API server's host (a Ray node?): "
                "merge_subjob stops them while it merges, and can only there"
            )
        if held in ("not stopped", "at its limit"):
            raise Conflict(f"Cannot hold this worker for the merge ({held}); try again")
        return await asyncio.to_thread(merge.merge_into_worktree, *args)
    except (GitError, OSError) as exc:
        raise Conflict(f"Cannot merge {branch} into this worktree: {exc}") from exc
    finally:
        if held not in ("no cgroups", "not here"):
            await _release(session, hold, worker_id)


async def _release(session: AsyncSession, hold: WorkerHold, worker_id: str) -> None:
    """Continue the worker unless it was paused or ended meanwhile (the engine's SIGSTOP of a pause
    found it stopped already and counts it paused; an ending worker is the engine's to signal).
    The status is read with the worker's row locked until the request commits (FOR UPDATE on
    PostgreSQL; on SQLite the request's transaction already excludes writers): a pause cannot
    commit between this read and the SIGCONT, and the engine applies a pause only once committed."""
    query = for_update(session, select(Worker.status).where(Worker.id == worker_id))
    status = (await session.execute(query.execution_options(populate_existing=True))).scalar_one_or_none()
    if status == WorkerStatus.RUNNING:
        await asyncio.to_thread(hold.resume, worker_id)
