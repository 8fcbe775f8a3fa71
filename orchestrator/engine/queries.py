"""The engine's SQL: claiming jobs, engine liveness, and what needs attention."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol, cast

from sqlalchemy import (
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import BindParameter

from orchestrator.core.ids import new_worker_id
from orchestrator.core.states import WORKER_LIVE, JobStatus, WorkerStatus
from orchestrator.db import precompiled as fast
from orchestrator.db.events import record_event
from orchestrator.db.locking import for_update, is_postgres
from orchestrator.db.models import Allocation, EngineRecord, Job, Worker, utcnow

ACTIVE_JOB = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
LIVE = tuple(s.value for s in WORKER_LIVE)
CLAIM_ALLOCATED = 100  # jobs holding explicitly allocated slots, claimed per pass (PostgreSQL)


class ClaimedJob(NamedTuple):
    """What making a claimed job's workers needs (plain values: ORM objects cost more to load)."""

    id: str
    worker_count: int
    workspace_id: str | None
    depth: int
    agent: str


async def register_engine(session: AsyncSession, engine_id: str, host: str, pid: int) -> None:
    now = utcnow()
    session.add(EngineRecord(id=engine_id, host=host, pid=pid, started_at=now, heartbeat_at=now))
    await session.flush()


async def heartbeat(session: AsyncSession, engine_id: str) -> bool:
    result = await session.execute(
        update(EngineRecord).where(EngineRecord.id == engine_id).values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def unregister_engine(session: AsyncSession, engine_id: str) -> None:
    await session.execute(delete(EngineRecord).where(EngineRecord.id == engine_id))


async def list_engines(session: AsyncSession) -> list[EngineRecord]:
    stmt = select(EngineRecord).execution_options(populate_existing=True)
    return list((await session.execute(stmt)).scalars())


async def live_engine_ids(session: AsyncSession, lease: timedelta, now: datetime) -> set[str]:
    stmt = select(EngineRecord.id).where(EngineRecord.heartbeat_at >= now - lease)
    return set((await session.execute(stmt)).scalars())


# Jobs holding slots no worker holds (an explicit allocation): few, and read through a partial
# index (ix_allocations_unbound) instead of probed for every PENDING job.
_UNBOUND_JOB_IDS = select(Allocation.job_id).where(Allocation.slots > Allocation.bound)
_FAST_UNBOUND_JOB_IDS = fast.FastStatement(_UNBOUND_JOB_IDS)
_HAS_UNBOUND = Job.id.in_(_UNBOUND_JOB_IDS)


async def claim_pending(session: AsyncSession, engine_id: str, room: dict[int, int]) -> list[ClaimedJob]:
    """Take unowned PENDING jobs that can start soon, highest priority first, FIFO within a
    priority: at each depth at most `room[depth]`, plus any job holding slots of an explicit
    allocation. Jobs that could not start stay unowned, for this engine's next pass or another
    engine, and the engine's own backlog (every pass reads it) stays small.

    On SQLite the allocated jobs are read first, on their own: inside the claim its planner (it
    has no statistics) walked every PENDING job to test each against them, 4.6 ms a pass with
    10,000 queued, where their own read and a lookup by key cost microseconds. PostgreSQL plans
    the one statement well from its statistics, and a second statement is a round trip."""
    postgres = is_postgres(session)
    depths = tuple(depth for depth, count in sorted(room.items()) if count > 0)
    params: dict[str, object] = {f"n{depth}": room[depth] for depth in depths}
    if postgres:
        params["n_allocated"] = CLAIM_ALLOCATED
        statement = _claim_candidates(depths, allocated=True, postgres=True)
    else:
        allocated = [row.job_id for row in await fast.fetch(session, _FAST_UNBOUND_JOB_IDS)]
        if not depths and not allocated:
            return []
        if allocated:
            params["allocated"] = allocated
        statement = _claim_candidates(depths, allocated=bool(allocated), postgres=False)
    ids = {row.id for row in await fast.fetch(session, statement, params)}
    if not ids:
        return []
    rows = await fast.fetch(session, _CLAIM, {"ids": list(ids), "b_engine": engine_id})
    return [ClaimedJob(*row) for row in rows]


@functools.cache
def _claim_candidates(depths: tuple[int, ...], *, allocated: bool, postgres: bool) -> fast.FastStatement:
    """One statement for all depths, built once per set of depths: each part a derived table
    with its own ORDER BY / LIMIT (and, on PostgreSQL, its own FOR UPDATE SKIP LOCKED, which a
    sub-SELECT may carry). The PENDING jobs of each depth are read from ix_jobs_pending_order in
    its order, so a part reads its first rows, not the whole queue."""
    pending = and_(Job.status == JobStatus.PENDING.value, Job.engine_id.is_(None))
    order = (Job.priority.desc(), Job.created_at)
    parts = [
        select(Job.id).where(pending, Job.depth == depth).order_by(*order).limit(bindparam(f"n{depth}"))
        for depth in depths
    ]
    if allocated and postgres:
        in_order = select(Job.id).where(pending, _HAS_UNBOUND).order_by(Job.depth, *order)
        parts.append(in_order.limit(bindparam("n_allocated")))
    elif allocated:
        # The ids read just before, by key and in no order: with an ORDER BY SQLite's planner
        # walks the PENDING index instead.
        parts.append(select(Job.id).where(pending, Job.id.in_(bindparam("allocated", expanding=True))))
    if postgres:
        parts = [part.with_for_update(skip_locked=True) for part in parts]
    return fast.FastStatement(union_all(*(select(part.subquery().c.id) for part in parts)))


_JOBS = cast(Table, Job.__table__)
# "Still unowned" as coalesce(engine_id, '') = '' rather than engine_id IS NULL: for the latter
# SQLite's planner (no statistics) walks ix_jobs_engine_status over every unowned job (1.9 ms
# with 10,000 queued) instead of looking the few ids up by key. Engine ids are never empty.
_CLAIM = fast.FastStatement(
    update(_JOBS)
    .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)), func.coalesce(_JOBS.c.engine_id, "") == "")
    .values(engine_id=bindparam("b_engine"))
    .returning(_JOBS.c.id, _JOBS.c.worker_count, _JOBS.c.workspace_id, _JOBS.c.depth, _JOBS.c.agent)
)
_OWNED_PENDING = fast.FastStatement(
    select(Job.depth, func.count())
    .where(Job.engine_id == bindparam("engine_id"), Job.status == JobStatus.PENDING.value)
    .group_by(Job.depth)
)


async def owned_pending_by_depth(session: AsyncSession, engine_id: str) -> dict[int, int]:
    """How many jobs this engine claimed and has not started yet, per depth."""
    rows = await fast.fetch(session, _OWNED_PENDING, {"engine_id": engine_id})
    return {depth: int(count) for depth, count in rows}


async def orphaned_jobs(session: AsyncSession, live_engines: set[str]) -> list[Job]:
    """Jobs of dead engines to take over: unfinished ones, and finished ones (a cancel) whose
    workers still hold slots, that is whose processes may still run: a cancel recorded after its
    engine died must still stop them."""
    owned_by_dead = (Job.engine_id.is_not(None), Job.engine_id.not_in(live_engines))
    active = select(Job).where(Job.status.in_(ACTIVE_JOB), *owned_by_dead)
    holding = (
        select(Worker.job_id)
        .join(Job, Job.id == Worker.job_id)
        .where(Worker.holds_slot.is_(True), Job.status.not_in(ACTIVE_JOB), *owned_by_dead)
        .distinct()
    )
    found = list((await session.execute(active.execution_options(populate_existing=True))).scalars())
    ended = [job_id for (job_id,) in (await session.execute(holding)).all()]
    if ended:
        stmt = select(Job).where(Job.id.in_(ended)).execution_options(populate_existing=True)
        found += list((await session.execute(stmt)).scalars())
    return found


async def take_over_job(session: AsyncSession, job_id: str, old_engine: str | None, engine_id: str) -> bool:
    result = await session.execute(
        update(Job).where(Job.id == job_id, Job.engine_id == old_engine).values(engine_id=engine_id)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


_WORKER_COLUMNS = (
    "id",
    "job_id",
    "workspace_id",
    "status",
    "worker_index",
    "depth",
    "agent",
    "holds_slot",
    "log_offset",
    "log_lines",
    "cost_usd",
    "input_tokens",
    "output_tokens",
    "created_at",
    "updated_at",
)
_INSERT_WORKERS = fast.FastStatement(
    insert(cast(Table, Worker.__table__)).values({name: bindparam(name) for name in _WORKER_COLUMNS})
)


async def create_workers(session: AsyncSession, jobs: list[ClaimedJob], actor: str) -> None:
    """The IDLE workers of newly claimed jobs: one multi-row INSERT (nothing needs them as
    objects in this session; the scheduler reads the IDLE workers it can start)."""
    now = utcnow()
    rows: list[dict[str, object]] = []
    for job in jobs:
        for index in range(job.worker_count):
            worker_id = new_worker_id()
            rows.append(
                {
                    "id": worker_id,
                    "job_id": job.id,
                    "workspace_id": job.workspace_id,
                    "status": WorkerStatus.IDLE.value,
                    "worker_index": index,
                    "depth": job.depth,
                    "agent": job.agent,
                    "holds_slot": False,
                    "log_offset": 0,
                    "log_lines": 0,
                    "cost_usd": 0.0,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            record_event(
                session,
                job_id=job.id,
                worker_id=worker_id,
                kind="worker.status",
                actor=actor,
                from_status=None,
                to_status=WorkerStatus.IDLE.value,
                reason="created",
                created_at=now,
            )
    await fast.execute_many(session, _INSERT_WORKERS, rows)


class WorkerRow(Protocol):
    """What the engine reads of a worker it starts (a `fast.Record`, or a Worker object)."""

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
    """What the engine reads of the job of a worker it starts (a `fast.Record`, or a Job object)."""

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


_WORKER_ROW = tuple(getattr(Worker, name) for name in WorkerRow.__annotations__)
_JOB_ROW = tuple(getattr(Job, name) for name in JobRow.__annotations__)
_WORKER_RECORD = fast.record_type(_WORKER_ROW)
_JOB_RECORD = fast.record_type(_JOB_ROW)


async def idle_workers(
    session: AsyncSession, engine_id: str, per_depth: dict[int, int], limit: int
) -> list[tuple[WorkerRow, JobRow]]:
    """IDLE workers that could start now, in queue order: at each depth at most `per_depth[d]`
    (its free slots, plus a little for workers the caller skips), and any worker of a job holding
    an unbound slot (an explicit allocation) or holding a slot already. Rows that could not start
    are never loaded: loading them cost more than all the rest of a pass."""
    depths = tuple(depth for depth, count in sorted(per_depth.items()) if count > 0)
    params: dict[str, object] = {f"n{depth}": per_depth[depth] for depth in depths}
    params.update(engine_id=engine_id, limit=limit)
    rows = await fast.fetch(session, _idle_workers_statement(depths), params)
    split = len(_WORKER_ROW)
    return [(_WORKER_RECORD(values[:split]), _JOB_RECORD(values[split:])) for values in map(tuple, rows)]


@functools.cache
def _idle_workers_statement(depths: tuple[int, ...]) -> fast.FastStatement:
    """Built once per set of depths with free slots; the counts are parameters."""
    candidates = and_(
        Job.engine_id == bindparam("engine_id"),
        Job.status.in_(ACTIVE_JOB),
        Worker.status == WorkerStatus.IDLE.value,
        Worker.pid.is_(None),
    )
    queue_order = (Job.priority.desc(), Job.created_at, Worker.worker_index)
    ranked = (
        select(
            Worker.id.label("worker_id"),
            func.row_number().over(partition_by=Job.depth, order_by=queue_order).label("place"),
        )
        .join(Job, Job.id == Worker.job_id)
        .where(candidates)
        .subquery()
    )
    allowed = (
        case(*((Job.depth == depth, bindparam(f"n{depth}")) for depth in depths), else_=0)
        if depths
        else literal(0)
    )
    return fast.FastStatement(
        select(*_WORKER_ROW, *_JOB_ROW)
        .join(Job, Job.id == Worker.job_id)
        .join(ranked, ranked.c.worker_id == Worker.id)
        .where(or_(ranked.c.place <= allowed, _HAS_UNBOUND, Worker.holds_slot.is_(True)))
        .order_by(Job.depth, *queue_order)
        .limit(bindparam("limit"))
    )


# Read every pass: built once (a reused statement's cache key is memoized; see _claim_candidates).
_IDS: BindParameter[list[str]] = bindparam("ids", expanding=True)
_WORKER_STATUSES = fast.FastStatement(
    select(Worker.id, Worker.status, Job.status).join(Job, Job.id == Worker.job_id).where(Worker.id.in_(_IDS))
)
_WORKERS_OF_JOBS = select(Worker).where(Worker.job_id.in_(_IDS)).execution_options(populate_existing=True)
_ENDINGS_OF_JOBS = fast.FastStatement(
    select(Worker.job_id, Worker.id, Worker.status, Worker.status_reason, Worker.holds_slot)
    .where(Worker.job_id.in_(_IDS))
    .order_by(Worker.job_id, Worker.worker_index)
)
_JOBS_WITHOUT_LIVE_WORKERS = fast.FastStatement(
    select(Job.id, Job.status, Job.depth, Job.started_at).where(
        Job.engine_id == bindparam("engine_id"),
        Job.status.in_(ACTIVE_JOB),
        ~exists().where(and_(Worker.job_id == Job.id, Worker.status.in_(LIVE))),
    ),
    lock=True,
    lock_of=Job,
)
_CHILDREN = fast.FastStatement(
    select(Job.parent_job_id, Job.id, Job.status).where(Job.parent_job_id.in_(_IDS))
)
_UNBOUND = fast.FastStatement(
    select(Allocation.job_id, Allocation.slots - Allocation.bound).where(Allocation.job_id.in_(_IDS))
)
_JOBS_BY_ID = select(Job).where(Job.id.in_(_IDS)).execution_options(populate_existing=True)
_WORKERS_BY_ID = select(Worker).where(Worker.id.in_(_IDS)).execution_options(populate_existing=True)


async def worker_statuses(session: AsyncSession, worker_ids: list[str]) -> dict[str, tuple[str, str]]:
    """(worker status, its job's status) of each worker."""
    if not worker_ids:
        return {}
    rows = await fast.fetch(session, _WORKER_STATUSES, {"ids": worker_ids})
    return {worker_id: (status, job_status) for worker_id, status, job_status in rows}


async def workers_for_jobs(session: AsyncSession, job_ids: list[str]) -> list[Worker]:
    return list((await session.execute(_WORKERS_OF_JOBS, {"ids": job_ids})).scalars())


class SettlingJob(Protocol):
    """A job whose outcome may be decided (a `fast.Record`)."""

    id: str
    status: str
    depth: int
    started_at: datetime | None


async def jobs_without_live_workers(session: AsyncSession, engine_id: str) -> list[SettlingJob]:
    """The engine's active jobs none of whose workers is live, locked until the transaction ends
    (db/locking.py)."""
    return await fast.fetch(session, _JOBS_WITHOUT_LIVE_WORKERS, {"engine_id": engine_id})


async def children_statuses(session: AsyncSession, parent_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(child id, status) of the children of each of `parent_ids`."""
    found: dict[str, list[tuple[str, str]]] = {}
    for parent_id, child_id, status in await fast.fetch(session, _CHILDREN, {"ids": parent_ids}):
        if parent_id is not None:
            found.setdefault(parent_id, []).append((child_id, status))
    return found


class WorkerEnding(NamedTuple):
    id: str
    status: str
    status_reason: str | None
    holds_slot: bool


async def worker_endings(session: AsyncSession, job_ids: list[str]) -> dict[str, list[WorkerEnding]]:
    """How each job's workers stand, in worker order: plain rows, all settling needs (loading
    whole ORM rows cost four times as much per pass)."""
    found: dict[str, list[WorkerEnding]] = {}
    rows = await fast.fetch(session, _ENDINGS_OF_JOBS, {"ids": job_ids})
    for job_id, worker_id, status, reason, holds_slot in rows:
        found.setdefault(job_id, []).append(WorkerEnding(worker_id, status, reason, holds_slot))
    return found


async def unbound_slots(session: AsyncSession, job_ids: list[str]) -> dict[str, int]:
    """Slots each job holds that no worker holds (an explicit allocation not used up)."""
    rows = await fast.fetch(session, _UNBOUND, {"ids": job_ids})
    return {job_id: int(free) for job_id, free in rows}


async def jobs_by_id(session: AsyncSession, job_ids: list[str]) -> dict[str, Job]:
    if not job_ids:
        return {}
    return {job.id: job for job in (await session.execute(_JOBS_BY_ID, {"ids": job_ids})).scalars()}


async def workers_by_id(
    session: AsyncSession, worker_ids: list[str], *, lock: bool = False
) -> dict[str, Worker]:
    """Whole rows; `lock`: held until the transaction ends (db/locking.py)."""
    if not worker_ids:
        return {}
    stmt = for_update(session, _WORKERS_BY_ID) if lock else _WORKERS_BY_ID
    return {worker.id: worker for worker in (await session.execute(stmt, {"ids": worker_ids})).scalars()}
