"""The lifecycles of jobs and workers, declared as transition tables.

Every status change in the product goes through `jobs.repository.transition_job` or
`workers.repository.transition_worker`, which consult these tables and apply the change with a
conditional UPDATE, so two racing requests cannot both win.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class WorkerStatus(StrEnum):
    IDLE = "IDLE"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TERMINATED = "TERMINATED"


JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}

WORKER_TRANSITIONS: dict[WorkerStatus, frozenset[WorkerStatus]] = {
    # IDLE -> FAILED: the process could not be started; IDLE -> TERMINATED: stopped before it started.
    WorkerStatus.IDLE: frozenset({WorkerStatus.RUNNING, WorkerStatus.FAILED, WorkerStatus.TERMINATED}),
    WorkerStatus.RUNNING: frozenset(
        {WorkerStatus.PAUSED, WorkerStatus.COMPLETED, WorkerStatus.FAILED, WorkerStatus.TERMINATED}
    ),
    # A paused worker may still be seen to have ended (it exited just before SIGSTOP, or was killed).
    WorkerStatus.PAUSED: frozenset(
        {WorkerStatus.RUNNING, WorkerStatus.COMPLETED, WorkerStatus.FAILED, WorkerStatus.TERMINATED}
    ),
    WorkerStatus.COMPLETED: frozenset(),
    WorkerStatus.FAILED: frozenset(),
    WorkerStatus.TERMINATED: frozenset(),
}

JOB_FINAL = frozenset(s for s, targets in JOB_TRANSITIONS.items() if not targets)
WORKER_FINAL = frozenset(s for s, targets in WORKER_TRANSITIONS.items() if not targets)
WORKER_LIVE = frozenset(set(WorkerStatus) - WORKER_FINAL)
