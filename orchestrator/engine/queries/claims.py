"""Claiming: unowned PENDING jobs an engine takes, the IDLE workers it makes for them, and the
IDLE workers it could start now (the scheduler's reads, one statement each per pass)."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import cast

from sqlalchemy import (
    Table,
    and_,
    any_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.ids import new_worker_id
from orchestrator.core.states import JobStatus, WorkerStatus
from orchestrator.db import precompiled
from orchestrator.db.locking import is_postgres
from orchestrator.db.models import Job, Worker, utcnow
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.queries.rows import (
    ACTIVE_JOB,
    HAS_UNBOUND,
    JOB_RECORD,
    JOB_ROW,
    UNBOUND_JOB_IDS,
    WORKER_RECORD,
    WORKER_ROW,
    ClaimedJob,
    JobRow,
    WorkerRow,
)

CLAIM_ALLOCATED = 100  # jobs holding explicitly allocated slots, claimed per pass (PostgreSQL)
_FAST_UNBOUND_JOB_IDS = precompiled.Statement(UNBOUND_JOB_IDS)


async def claim_pending(session: AsyncSession, engine_id: str, room: dict[int, int]) -> list[ClaimedJob]:
    """Take unowned PENDING jobs that can start soon, highest priority first, FIFO within a
    priority: at each depth at most `room[depth]`, plus any job holding slots of an explicit
    allocation. Jobs that could not start stay unowned, for this engine's next pass or another
    engine, and the engine's own backlog (every pass reads it) stays small.

    On SQLite the allocated jobs are read first, on their own: inside the claim its planner (it
    has no statistics) walked every PENDING job to test each against them, a cost that grows
    with the queue, where their own read and a lookup by key do not (docs/BENCHMARKS.md).
    On PostgreSQL they are one statement (a second would be a round trip), their ids read as an
    array before the jobs are (`_claim_candidates`)."""
    postgres = is_postgres(session)
    depths = tuple(depth for depth, count in sorted(room.items()) if count > 0)
    params: dict[str, object] = {f"n{depth}": room[depth] for depth in depths}
    if postgres:
        params["n_allocated"] = CLAIM_ALLOCATED
        statement = _claim_candidates(depths, allocated=True, postgres=True)
    else:
        allocated = [row.job_id for row in await precompiled.fetch(session, _FAST_UNBOUND_JOB_IDS)]
        if not depths and not allocated:
            return []
        if allocated:
            params["allocated"] = allocated
        statement = _claim_candidates(depths, allocated=bool(allocated), postgres=False)
    ids = {row.id for row in await precompiled.fetch(session, statement, params)}
    if not ids:
        return []
    rows = await precompiled.fetch(session, _CLAIM, {"ids": list(ids), "b_engine": engine_id})
    return [ClaimedJob(*row) for row in rows]


@functools.cache
def _claim_candidates(depths: tuple[int, ...], *, allocated: bool, postgres: bool) -> precompiled.Statement:
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
        # The unbound jobs' ids as an array read first (one probe of ix_allocations_unbound):
        # as `IN (subquery)` the planner, which cannot estimate `slots > bound`, walked the whole
        # PENDING queue probing allocations for each job, a pass's cost growing with the queue.
        unbound = Job.id == any_(func.array(UNBOUND_JOB_IDS.scalar_subquery()))
        in_order = select(Job.id).where(pending, unbound).order_by(Job.depth, *order)
        parts.append(in_order.limit(bindparam("n_allocated")))
    elif allocated:
        # The ids read just before, by key and in no order: with an ORDER BY SQLite's planner
        # walks the PENDING index instead.
        parts.append(select(Job.id).where(pending, Job.id.in_(bindparam("allocated", expanding=True))))
    if postgres:
        parts = [part.with_for_update(skip_locked=True) for part in parts]
    return precompiled.Statement(union_all(*(select(part.subquery().c.id) for part in parts)))


_JOBS = cast(Table, Job.__table__)
# "Still unowned" as coalesce(engine_id, '') = '' rather than engine_id IS NULL: for the latter
# SQLite's planner (no statistics) walks ix_jobs_engine_status over every unowned job instead
# of looking the few ids up by key. Engine ids are never empty.
_CLAIM = precompiled.Statement(
    update(_JOBS)
    .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)), func.coalesce(_JOBS.c.engine_id, "") == "")
    .values(engine_id=bindparam("b_engine"))
    .returning(_JOBS.c.id, _JOBS.c.worker_count, _JOBS.c.workspace_id, _JOBS.c.depth, _JOBS.c.agent)
)
_OWNED_PENDING = precompiled.Statement(
    select(Job.depth, func.count())
    .where(Job.engine_id == bindparam("engine_id"), Job.status == JobStatus.PENDING.value)
    .group_by(Job.depth)
)


async def owned_pending_by_depth(session: AsyncSession, engine_id: str) -> dict[int, int]:
    """How many jobs this engine claimed and has not started yet, per depth."""
    rows = await precompiled.fetch(session, _OWNED_PENDING, {"engine_id": engine_id})
    return {depth: int(count) for depth, count in rows}


# The columns a new worker's row is written with (here, and by PostgreSQL's claim).
WORKER_COLUMNS = (
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
_INSERT_WORKERS = precompiled.Statement(
    insert(cast(Table, Worker.__table__)).values({name: bindparam(name) for name in WORKER_COLUMNS})
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
            record_worker_created(session, job.id, worker_id, actor, now)
    await precompiled.execute_many(session, _INSERT_WORKERS, rows)


def record_worker_created(
    session: AsyncSession, job_id: str, worker_id: str, actor: str, now: datetime
) -> None:
    """The event of an IDLE worker made for a claimed job (on either database's way of making it)."""
    unit_of_work(session).record_event(
        job_id=job_id,
        worker_id=worker_id,
        kind="worker.status",
        actor=actor,
        from_status=None,
        to_status=WorkerStatus.IDLE.value,
        reason="created",
        created_at=now,
    )


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
    rows = await precompiled.fetch(session, _idle_workers_statement(depths, is_postgres(session)), params)
    split = len(WORKER_ROW)
    return [(WORKER_RECORD(values[:split]), JOB_RECORD(values[split:])) for values in map(tuple, rows)]


@functools.cache
def _idle_workers_statement(depths: tuple[int, ...], postgres: bool) -> precompiled.Statement:
    """Built once per set of depths with free slots; the counts are parameters. On PostgreSQL
    the engine's id is matched as coalesce(engine_id, ''): compared plainly, the planner, before
    the table has statistics, looked each IDLE worker's job up through ix_jobs_engine_status
    (every active job of the engine, per worker) instead of by key."""
    owner = func.coalesce(Job.engine_id, "") if postgres else Job.engine_id
    candidates = and_(
        owner == bindparam("engine_id"),
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
    return precompiled.Statement(
        select(*WORKER_ROW, *JOB_ROW)
        .join(Job, Job.id == Worker.job_id)
        .join(ranked, ranked.c.worker_id == Worker.id)
        .where(or_(ranked.c.place <= allowed, HAS_UNBOUND, Worker.holds_slot.is_(True)))
        .order_by(Job.depth, *queue_order)
        .limit(bindparam("limit"))
    )


async def waiting_at(session: AsyncSession, depths: list[int]) -> bool:
    """Whether an unowned PENDING job waits at one of `depths` (an index probe of
    ix_jobs_pending_order per depth)."""
    waiting = (
        select(Job.id)
        .where(Job.status == JobStatus.PENDING.value, Job.depth.in_(depths), Job.engine_id.is_(None))
        .limit(1)
    )
    return (await session.execute(waiting)).first() is not None
