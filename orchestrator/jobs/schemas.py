"""Request and response bodies of the job orchestrator API (shapes from the API guide)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.core.config import get_settings
from orchestrator.core.states import JobStatus
from orchestrator.workspaces.refs import ref_format_error

# A task reaches the worker on stdin (and, for command profiles, in ORCHESTRATOR_TASK): 64 KiB
# fits a pipe's buffer and the kernel's limit on one environment string (128 KiB).
MAX_TASK_BYTES = 64 * 1024
# Options go to agents that walk them recursively; a request body is bounded at 64 levels.
MAX_OPTIONS_DEPTH = 32


def nesting_depth(value: Any) -> int:
    """Levels of dicts and lists in `value` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            deepest = max(deepest, depth + 1)
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
            deepest = max(deepest, depth + 1)
    return deepest


# Printable ASCII without spaces: it is matched exactly and shown in logs.
DELEGATION_KEY_PATTERN = r"^[A-Za-z0-9._:/@+-]{1,128}$"


class JobLimits(BaseModel):
    """Per-job sandbox limits of each worker: memory (MiB), processes/threads, and the network
    ("none" only narrows a profile; a profile without network cannot be given one)."""

    model_config = ConfigDict(extra="forbid")

    memory_mb: int | None = Field(default=None, ge=16, le=1_048_576, strict=True)
    pids: int | None = Field(default=None, ge=8, le=1_000_000, strict=True)
    network: Literal["on", "none"] | None = None


class JobSubmit(BaseModel):
    # Integers must be JSON integers (not `true` or "3"); floats must be finite.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task_description: str = Field(
        min_length=1,
        json_schema_extra={"maxLength": MAX_TASK_BYTES},  # characters <= bytes: checked in bytes
        examples=["Implement user authentication"],
        description=f"At most {MAX_TASK_BYTES} bytes of UTF-8 (64 KiB).",
    )
    worker_count: int = Field(
        default=1, ge=1, strict=True, description="Workers to run; at most the quota of the depth."
    )
    depth: int = Field(
        default=0, ge=0, strict=True, description="0 for a root job; a child's is its parent's + 1."
    )
    parent_job_id: str | None = Field(default=None, max_length=64)
    priority: int = Field(
        default=0, ge=-1000, le=1000, strict=True, description="Higher runs first within a depth."
    )
    agent: str | None = Field(default=None, description="Agent profile; the server's default if omitted.")
    agent_options: dict[str, Any] = Field(
        default_factory=dict, description=f"Nested at most {MAX_OPTIONS_DEPTH} levels deep."
    )
    timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    repository: str | None = Field(
        default=None, max_length=4096, description="Local git repository under an allowed root."
    )
    base_ref: str | None = Field(default=None, max_length=255)
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_turns: int | None = Field(default=None, ge=1, le=1_000_000, strict=True)
    delegation_key: str | None = Field(
        default=None,
        pattern=DELEGATION_KEY_PATTERN,
        description="The submitter's key for this child, unique per parent (needs parent_job_id): "
        "a submit whose answer was lost is looked up by it (GET /api/jobs?delegation_key=...) "
        "before it is retried; a second submit with the same key is 409.",
    )
    limits: JobLimits | None = Field(
        default=None,
        description="The workers' sandbox limits (docs/SANDBOX.md); at most the agent profile's maximum.",
    )

    @field_validator("task_description", "parent_job_id", "agent", "repository", "base_ref")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # PostgreSQL cannot store NUL in text, and no path or name contains one.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("base_ref")
    @classmethod
    def _ref_format(cls, value: str | None) -> str | None:
        # Checked before any git command sees it: a ref such as `--upload-pack=...` or one with a
        # newline must never reach git or the logs.
        if value is not None and (why := ref_format_error(value)) is not None:
            raise ValueError(f"base_ref {why}: a branch or tag name (git check-ref-format) or a commit id")
        return value

    @field_validator("task_description")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("task_description must not be blank")
        return value

    @field_validator("task_description")
    @classmethod
    def _within_task_bytes(cls, value: str) -> str:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_TASK_BYTES:
            raise ValueError(
                f"task_description is {size} bytes of UTF-8; the limit is {MAX_TASK_BYTES} bytes (64 KiB)"
            )
        return value

    @field_validator("agent_options")
    @classmethod
    def _options_depth(cls, value: dict[str, Any]) -> dict[str, Any]:
        if nesting_depth(value) > MAX_OPTIONS_DEPTH:
            raise ValueError(f"agent_options is nested deeper than {MAX_OPTIONS_DEPTH} levels")
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
    limits: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    delegation_key: str | None = None


class JobList(BaseModel):
    jobs: list[JobOut]
    total: int
    limit: int
    offset: int


class JobCounts(BaseModel):
    counts: dict[str, int] = Field(description="Jobs per status, every status present.")
    total: int


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


class WorkerUsageOut(BaseModel):
    worker_id: str
    job_id: str
    status: str
    cost_usd: float
    input_tokens: int
    output_tokens: int


class JobUsage(BaseModel):
    """What a job's whole subtree spent, as its agents reported it."""

    job_id: str
    cost_usd: float = Field(description="Sum of the cost reported by every worker of the subtree (USD).")
    input_tokens: int
    output_tokens: int
    jobs: int = Field(description="Jobs in the subtree, the job included.")
    workers: list[WorkerUsageOut]
    max_cost_usd: float | None = None
    reserved_usd: float | None = Field(
        default=None, description="Budget reserved by unfinished children beyond what they spent."
    )
    remaining_usd: float | None = Field(default=None, description="max_cost_usd - cost_usd - reserved_usd.")
    max_turns: int | None = None
