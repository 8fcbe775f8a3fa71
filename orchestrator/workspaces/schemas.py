"""Bodies of the workspaces API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class WorkspaceOut(BaseModel):
    id: str
    repository: str | None
    root_job_id: str | None
    created_at: datetime
    workers: int
    live_workers: int


class WorkspaceList(BaseModel):
    workspaces: list[WorkspaceOut]
    total: int
    limit: int
    offset: int


class MergedBranch(BaseModel):
    branch: str
    commit: str
    merge_commit: str | None = None  # None: it was already in the result (a no-op)


class ResultOut(BaseModel):
    """A job's result branch: its work and its subtree's, merged onto the job's base commit."""

    job_id: str
    status: str  # done | failed (a merge conflict nobody resolved: the branch holds what merged)
    reason: str | None
    repository: str
    branch: str
    commit: str | None
    base_commit: str | None
    merged: list[MergedBranch]
    conflicts: list[dict[str, Any]]
    diff_stat: str
    files_changed: int
    insertions: int
    deletions: int
    attempts: int  # more than 1: an engine died integrating it and another redid it


class MergeIntoWorkerOut(BaseModel):
    """What `merge_subjob` did in the calling worker's worktree."""

    job_id: str
    branch: str
    commit: str
    status: str  # merged | already merged | conflict (markers left in `files` for the agent)
    merge_commit: str | None
    files: list[str]
    diff_stat: str
