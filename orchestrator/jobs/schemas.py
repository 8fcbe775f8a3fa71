"""Request and response bodies of the job orchestrator API (shapes from the API guide)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.core.config import get_settings
from orchestrator.core.states import JobStatus


class JobSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_description: str = Field(
        min_length=1, max_length=100_000, examples=["Implement user authentication"]
    )
    worker_count: int = Field(default=1, ge=1, description="Workers to run; at most the quota of the depth.")
    depth: int = Field(default=0, ge=0, description="0 for a root job; a child's is its parent's + 1.")
    parent_job_id: str | None = None
    priority: int = Field(default=0, ge=-1000, le=1000, description="Higher runs first within a depth.")
    agent: str | None = Field(default=None, description="Agent profile; the server's default if omitted.")
    agent_options: dict[str, Any] = Field(default_factory=dict)
    timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    repository: str | None = Field(default=None, description="Local git repository under an allowed root.")
    base_ref: str | None = Field(default=None, max_length=255)
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_turns: int | None = Field(default=None, ge=1)

    @field_validator("task_description")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("task_description must not be blank")
        return value

    @field_validator("depth")
    @classmethod
    def _within_deepest(cls, value: int) -> int:
        deepest = get_settings().max_depth
        if value > deepest:
            raise ValueError(f"depth must be between 0 and {deepest}")
        return value


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: JobStatus
    task_description: str
    worker_count: int
    depth: int
    parent_job_id: str | None
    created_at: datetime
    updated_at: datetime
    priority: int = 0
    agent: str
    agent_options: dict[str, Any] = Field(default_factory=dict)
    timeout_seconds: float | None = None
    repository: str | None = None
    base_ref: str | None = None
    workspace_id: str | None = None
    status_reason: str | None = None
    max_cost_usd: float | None = None
    max_turns: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobList(BaseModel):
    jobs: list[JobOut]
    total: int
    limit: int
    offset: int


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: str
    worker_id: str | None
    kind: str
    actor: str
    from_status: str | None
    to_status: str | None
    reason: str | None
    data: dict[str, Any] | None
    created_at: datetime


class EventList(BaseModel):
    job_id: str
    events: list[EventOut]
