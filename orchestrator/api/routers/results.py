"""A job's result: its result branch (engine/integrate.py) and its diff."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from orchestrator.api.deps import JobsRead, JobsWrite, SessionDep
from orchestrator.api.errors import BAD_REQUEST, ERROR_RESPONSES, NOT_FOUND
from orchestrator.executors.held import this_hosts_hold
from orchestrator.workspaces import results
from orchestrator.workspaces.schemas import MergeIntoWorkerOut, ResultOut

router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


@router.get("/{job_id}/result", response_model=ResultOut, responses={**NOT_FOUND, **BAD_REQUEST})
async def job_result(job_id: str, actor: JobsRead, session: SessionDep) -> ResultOut:
    """The job's result branch: 404 until it is integrated, 400 for a job without a repository."""
    return await results.result(session, actor, job_id)


@router.get(
    "/{job_id}/diff",
    response_model=None,
    responses={
        **NOT_FOUND,
        **BAD_REQUEST,
        200: {"description": "A unified diff", "content": {"text/x-diff": {"schema": {"type": "string"}}}},
    },
)
async def job_diff(
    job_id: str,
    actor: JobsRead,
    session: SessionDep,
    path: Annotated[str | None, Query(max_length=4096, description="one file only")] = None,
    max_bytes: Annotated[int, Query(ge=1, le=results.DIFF_MAX_BYTES)] = results.DIFF_DEFAULT_BYTES,
) -> PlainTextResponse:
    """The unified diff of the result against its base commit, cut at `max_bytes` (the
    `X-Diff-Truncated` header says whether it was)."""
    text, cut, row = await results.diff(session, actor, job_id, path, max_bytes)
    headers = {
        "X-Diff-Truncated": "true" if cut else "false",
        "X-Result-Branch": row.branch,
        "X-Result-Commit": row.commit or "",
        "X-Base-Commit": row.base_commit or "",
    }
    return PlainTextResponse(text, media_type="text/x-diff; charset=utf-8", headers=headers)


@router.post(
    "/{job_id}/merge",
    response_model=MergeIntoWorkerOut,
    responses={**NOT_FOUND, **BAD_REQUEST},
)
async def merge_into_worker(job_id: str, actor: JobsWrite, session: SessionDep) -> MergeIntoWorkerOut:
    """A worker merges its finished sub-job's result branch into its own worktree (`merge_subjob`);
    a conflict leaves the markers in place for the agent to resolve."""
    return await results.merge_into_worker(session, actor, job_id, this_hosts_hold())
