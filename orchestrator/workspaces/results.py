"""Reading a job's result: its result branch, what was merged, and its diff against its base."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.errors import BadRequest, NotFound
from orchestrator.db.models import Integration
from orchestrator.jobs.service import get_visible_job
from orchestrator.workspaces import merge
from orchestrator.workspaces.git import GitError
from orchestrator.workspaces.schemas import MergedBranch, ResultOut

DIFF_DEFAULT_BYTES = 1_000_000
DIFF_MAX_BYTES = 20_000_000


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
        try:
            summary = await asyncio.to_thread(
                merge.summarize, Path(row.repository), row.base_commit, row.commit
            )
        except (GitError, OSError) as exc:
            raise NotFound(
                f"Job {job_id}'s result can no longer be read from {row.repository}: {exc}"
            ) from exc
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
        diff_stat=summary.diff_stat,
        files_changed=summary.files_changed,
        insertions=summary.insertions,
        deletions=summary.deletions,
    )


async def diff(
    session: AsyncSession, actor: Actor, job_id: str, path: str | None, limit: int
) -> tuple[str, bool, Integration]:
    """The unified diff of the result against its base (one file with `path`), cut at `limit`."""
    row = await integration_of(session, actor, job_id)
    assert row.commit is not None
    if path is not None and (not path or "\0" in path or path.startswith("/")):
        raise BadRequest("path must be a file path relative to the repository")
    try:
        text, cut = await asyncio.to_thread(
            merge.diff, Path(row.repository), row.base_commit or row.commit, row.commit, path, limit
        )
    except (GitError, OSError) as exc:
        raise NotFound(f"Job {job_id}'s result can no longer be read from {row.repository}: {exc}") from exc
    return text, cut, row
