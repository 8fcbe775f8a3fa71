"""The engine's SQL, one module per concern: `rows` (the shapes read), `engines` (liveness and
take-over), `claims` (claiming and the scheduler's reads), `settle` (what settling reads),
`workers` (the supervised workers' reads and writes), `limits` (rate limits, budgets),
`integration` (results). Nothing here imports the engine's phases.

The names are re-exported for callers outside the engine (the integrator, the governor, tests)."""

from orchestrator.engine.queries.claims import (
    _CLAIM,
    _FAST_UNBOUND_JOB_IDS,
    _OWNED_PENDING,
    CLAIM_ALLOCATED,
    _claim_candidates,
    claim_pending,
    create_workers,
    idle_workers,
    owned_pending_by_depth,
)
from orchestrator.engine.queries.engines import (
    heartbeat,
    list_engines,
    live_engine_ids,
    orphaned_jobs,
    register_engine,
    take_over_job,
    unregister_engine,
)
from orchestrator.engine.queries.rows import (
    ACTIVE_JOB,
    LIVE,
    ClaimedJob,
    JobRow,
    SettlingJob,
    WorkerEnding,
    WorkerRow,
)
from orchestrator.engine.queries.settle import (
    children_statuses,
    jobs_without_live_workers,
    unbound_slots,
    worker_endings,
)
from orchestrator.engine.queries.workers import (
    jobs_by_id,
    worker_statuses,
    workers_by_id,
    workers_for_jobs,
)

__all__ = [
    "ACTIVE_JOB",
    "CLAIM_ALLOCATED",
    "LIVE",
    "_CLAIM",
    "_FAST_UNBOUND_JOB_IDS",
    "_OWNED_PENDING",
    "ClaimedJob",
    "JobRow",
    "SettlingJob",
    "WorkerEnding",
    "WorkerRow",
    "_claim_candidates",
    "children_statuses",
    "claim_pending",
    "create_workers",
    "heartbeat",
    "idle_workers",
    "jobs_by_id",
    "jobs_without_live_workers",
    "list_engines",
    "live_engine_ids",
    "orphaned_jobs",
    "owned_pending_by_depth",
    "register_engine",
    "take_over_job",
    "unbound_slots",
    "unregister_engine",
    "worker_endings",
    "worker_statuses",
    "workers_by_id",
    "workers_for_jobs",
]
