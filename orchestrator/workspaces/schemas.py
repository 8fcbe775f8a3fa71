"""Bodies of the workspaces API."""

from __future__ import annotations

from datetime import datetime

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
