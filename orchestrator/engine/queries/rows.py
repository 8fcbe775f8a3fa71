"""What the engine reads of jobs and workers, shared by every statement module: the row shapes
(plain records, cheaper to load than ORM objects) and the conditions several statements use."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import bindparam, select
from sqlalchemy.sql.elements import BindParameter

from orchestrator.core.states import WORKER_LIVE, JobStatus
from orchestrator.db import precompiled
from orchestrator.db.models import Allocation, Job, Worker

ACTIVE_JOB = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
LIVE = tuple(s.value for s in WORKER_LIVE)

# Read every pass: built once (a reused statement's cache key is memoized).
IDS: BindParameter[list[str]] = bindparam("ids", expanding=True)

# Jobs holding slots no worker holds (an explicit allocation): few, and read through a partial
# index (ix_allocations_unbound) instead of probed for every PENDING job.
UNBOUND_JOB_IDS = select(Allocation.job_id).where(Allocation.slots > Allocation.bound)
HAS_UNBOUND = Job.id.in_(UNBOUND_JOB_IDS)


class ClaimedJob(NamedTuple):
    """What making a claimed job's workers needs (plain values: ORM objects cost more to load)."""

    id: str
    worker_count: int
    workspace_id: str | None
    depth: int
    agent: str


class WorkerRow(Protocol):
    """What the engine reads of a worker it starts (a `precompiled.Record`, or a Worker object)."""

    id: str
    job_id: str
    status: str
    worker_index: int
    depth: int
    agent: str
    holds_slot: bool
    result: dict[str, Any] | None
    started_at: datetime | None


class JobRow(Protocol):
    """What the engine reads of the job of a worker it starts (a `precompiled.Record`, or a Job object)."""

    id: str
    status: str
    task_description: str
    worker_count: int
    depth: int
    agent: str
    agent_options: dict[str, Any]
    timeout_seconds: float | None
    repository: str | None
    base_ref: str | None
    path: str
    parent_job_id: str | None
    created_by_worker_id: str | None
    created_by: str
    max_turns: int | None
    limits: dict[str, Any] | None
    started_at: datetime | None


WORKER_ROW = tuple(getattr(Worker, name) for name in WorkerRow.__annotations__)
JOB_ROW = tuple(getattr(Job, name) for name in JobRow.__annotations__)
WORKER_RECORD = precompiled.record_type(WORKER_ROW)
JOB_RECORD = precompiled.record_type(JOB_ROW)


class SettlingJob(Protocol):
    """A job whose outcome may be decided (a `precompiled.Record`)."""

    id: str
    status: str
    depth: int
    started_at: datetime | None


class WorkerEnding(NamedTuple):
    id: str
    status: str
    status_reason: str | None
    holds_slot: bool
