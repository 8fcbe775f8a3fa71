"""Bodies of the supervisor API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from orchestrator.core.states import WorkerStatus


class WorkerOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    job_id: str
    workspace_id: str | None
    status: WorkerStatus
    created_at: datetime
    updated_at: datetime
    worker_index: int
    depth: int
    agent: str
    host: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    status_reason: str | None = None
    branch: str | None = None
    commit: str | None = None
    diff_stat: str | None = None
    result: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class WorkerList(BaseModel):
    workers: list[WorkerOut]
    total: int
    limit: int
    offset: int


class SystemMetrics(BaseModel):
    total_workers: int
    by_status: dict[WorkerStatus, int]


class LogLine(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    text: str
    created_at: datetime


class WorkerLogs(BaseModel):
    worker_id: str
    offset: int
    next_offset: int
    lines: list[LogLine]
    complete: bool
