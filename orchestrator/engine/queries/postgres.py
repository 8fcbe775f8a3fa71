"""PostgreSQL's statements for a pass, each in place of several: there every statement is a round
trip (and the server's parse, plan and wake-up on a shared host), so a pass's reads are merged
and its writes carried by data-modifying CTEs and `UPDATE … FROM unnest(arrays) … RETURNING`,
one statement for a whole batch whatever its size (arrays keep the statement text, and so its
prepared form, the same). SQLite runs the separate statements on its driver, where each costs
microseconds (engine/queries/claims.py, settle.py; resources/repository.py).

Every change of a status is still one guarded conditional UPDATE (`WHERE status = <as read>`),
and every slot counter still moves only through guarded UPDATEs (the CHECK constraints behind
them); a slot comes back exactly once, because the worker's row is locked when read and its
`holds_slot` cleared by the same guarded UPDATE that ends it."""

from __future__ import annotations

import functools
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy import cast as sa_cast
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.orm import aliased

from orchestrator.core.states import JobStatus, WorkerStatus
from orchestrator.db import precompiled
from orchestrator.db.models import Allocation, Event, Job, ResourcePool, UTCDateTime, Worker
from orchestrator.engine.queries.claims import WORKER_COLUMNS, _claim_candidates
from orchestrator.engine.queries.rows import ACTIVE_JOB, LIVE

_JOBS = cast(Table, Job.__table__)
_WORKERS = cast(Table, Worker.__table__)
_POOLS = cast(Table, ResourcePool.__table__)
_ALLOCATIONS = cast(Table, Allocation.__table__)


def _array(name: str, item: Any) -> Any:
    return bindparam(name, type_=ARRAY(item))


def _text(name: str) -> Any:
    return bindparam(name, type_=Text)


def _constant(value: str | int | bool) -> Any:
    """A constant written into the SQL text: no parameter to bind and send on every run. (Named
    parameters here never take a column's name: SQLAlchemy adds such a key to an UPDATE's SET.)"""
    if isinstance(value, bool):
        return literal_column("true" if value else "false", Boolean)
    if isinstance(value, int):
        return literal_column(str(value), Integer)
    assert "'" not in value
    return literal_column(f"'{value}'", String)


# ---------------------------------------------------------------- settle: one read for all

_child = aliased(Job)
_JSON_LIST = JSON(none_as_null=True)
SETTLING = precompiled.Statement(
    select(
        Job.id,
        Job.status,
        Job.depth,
        Job.started_at,
        Job.repository,
        select(Allocation.slots - Allocation.bound)
        .where(Allocation.job_id == Job.id)
        .scalar_subquery()
        .label("unbound"),
        select(
            func.json_agg(
                aggregate_order_by(
                    func.json_build_array(Worker.id, Worker.status, Worker.status_reason, Worker.holds_slot),
                    Worker.worker_index,
                ),
                type_=_JSON_LIST,
            )
        )
        .where(Worker.job_id == Job.id)
        .scalar_subquery()
        .label("workers"),
        select(func.json_agg(func.json_build_array(_child.id, _child.status), type_=_JSON_LIST))
        .where(_child.parent_job_id == Job.id)
        .scalar_subquery()
        .label("children"),
    ).where(
        Job.engine_id == bindparam("engine_id"),
        Job.status.in_(ACTIVE_JOB),
        ~exists().where(and_(Worker.job_id == Job.id, Worker.status.in_(LIVE))),
    ),
    lock=True,
    lock_of=Job,
)


# ---------------------------------------------------------------- starts: one statement for all

_started = (
    func.unnest(
        _array("w_ids", String),
        _array("w_known", String),
        _array("w_pids", Integer),
        _array("w_start_times", BigInteger),
        _array("w_run_dirs", Text),
        _array("w_workdirs", Text),
        _array("w_started", UTCDateTime()),
        _array("w_hosts", String),
        _array("w_branches", Text),
        _array("w_base_commits", Text),
    )
    .table_valued(
        "id",
        "known",
        "pid",
        "start_time",
        "run_dir",
        "workdir",
        "started_at",
        "host",
        "branch",
        "base_commit",
    )
    .render_derived(name="started")
)
_first = (
    func.unnest(_array("j_ids", String), _array("j_started", UTCDateTime()))
    .table_valued("id", "started_at")
    .render_derived(name="first_start")
)
_STARTED_WORKERS = (
    update(_WORKERS)
    .where(_WORKERS.c.id == _started.c.id, _WORKERS.c.status == _started.c.known)
    .values(
        status=_constant(WorkerStatus.RUNNING.value),
        status_reason=_constant("started"),
        updated_at=bindparam("now"),
        started_at=_started.c.started_at,
        pid=_started.c.pid,
        pid_start_time=_started.c.start_time,
        run_dir=_started.c.run_dir,
        workdir=_started.c.workdir,
        host=_started.c.host,
        engine_id=bindparam("b_engine"),
        branch=func.coalesce(_started.c.branch, _WORKERS.c.branch),
        result=case(
            (_started.c.branch.is_(None), _WORKERS.c.result),
            else_=func.json_build_object(literal_column("'base_commit'"), _started.c.base_commit),
        ),
    )
    .returning(_WORKERS.c.id, _WORKERS.c.holds_slot)
    .cte("started_workers")
)
_STARTED_JOBS = (
    update(_JOBS)
    .where(_JOBS.c.id == _first.c.id, _JOBS.c.status == _constant(JobStatus.PENDING.value))
    .values(
        status=_constant(JobStatus.RUNNING.value),
        status_reason=_constant("first worker started"),
        updated_at=bindparam("now"),
        started_at=_first.c.started_at,
    )
    .returning(_JOBS.c.id, _constant(False).label("holds_slot"))
    .cte("started_jobs")
)
# Workers first, then jobs (the lock order of record_starts on every database); and the NOTIFY
# that a pass which records starts publishes (UnitOfWork.publish's, without its round trip).
STARTS = precompiled.Statement(
    union_all(
        select(_constant("worker").label("kind"), _STARTED_WORKERS.c.id, _STARTED_WORKERS.c.holds_slot),
        select(_constant("job").label("kind"), _STARTED_JOBS.c.id, _STARTED_JOBS.c.holds_slot),
        select(
            _constant("notify").label("kind"),
            sa_cast(func.pg_notify(_text("n_channel"), _text("n_topic")), Text),
            literal_column("NULL::boolean", Boolean),
        ),
    )
)


# ---------------------------------------------------------------- slots

# The pass's slot moves in one statement, in the lock order of every slot move (allocations,
# pools, workers): per job (bound, slots) deltas, per depth the pool's, and the workers that now
# hold a slot. Each UPDATE is guarded as the separate ones are; the caller compares the counts.
_job_moves = (
    func.unnest(_array("a_jobs", String), _array("a_bound", Integer), _array("a_slots", Integer))
    .table_valued("job_id", "bound", "slots")
    .render_derived(name="job_moves")
)
_depth_moves = (
    func.unnest(_array("p_depths", Integer), _array("p_counts", Integer))
    .table_valued("depth", "count")
    .render_derived(name="depth_moves")
)
_MOVED_ALLOCATIONS = (
    update(_ALLOCATIONS)
    .where(
        _ALLOCATIONS.c.job_id == _job_moves.c.job_id,
        _ALLOCATIONS.c.bound + _job_moves.c.bound >= _constant(0),
        _ALLOCATIONS.c.bound + _job_moves.c.bound <= _ALLOCATIONS.c.slots + _job_moves.c.slots,
        _ALLOCATIONS.c.slots + _job_moves.c.slots <= _ALLOCATIONS.c.max_slots,
    )
    .values(
        bound=_ALLOCATIONS.c.bound + _job_moves.c.bound,
        slots=_ALLOCATIONS.c.slots + _job_moves.c.slots,
        updated_at=bindparam("now"),
    )
    .returning(_ALLOCATIONS.c.job_id)
    .cte("moved_allocations")
)
_MOVED_POOLS = (
    update(_POOLS)
    .where(
        _POOLS.c.depth == _depth_moves.c.depth,
        _POOLS.c.allocated + _depth_moves.c["count"] >= _constant(0),
        _POOLS.c.allocated + _depth_moves.c["count"] <= _POOLS.c.max_workers,
    )
    .values(allocated=_POOLS.c.allocated + _depth_moves.c["count"])
    .returning(_POOLS.c.depth)
    .cte("moved_pools")
)
_HOLDING = (
    update(_WORKERS)
    .where(_WORKERS.c.id == func.any(_array("hold", String)), _WORKERS.c.holds_slot.is_(_constant(False)))
    .values(holds_slot=_constant(True))
    .returning(_WORKERS.c.id)
    .cte("now_holding")
)
# The pass's events ride along (the last statement before its commit, which then writes none):
# in array order, `data` as JSON text.
_events = (
    func.unnest(
        _array("e_jobs", String),
        _array("e_workers", String),
        _array("e_kinds", String),
        _array("e_actors", String),
        _array("e_from", String),
        _array("e_to", String),
        _array("e_reasons", Text),
        _array("e_data", Text),
        _array("e_at", UTCDateTime()),
    )
    .table_valued("job_id", "worker_id", "kind", "actor", "from_status", "to_status", "reason", "data", "at")
    .render_derived(name="new_events", with_types=False)
)
_EVENT_TABLE = cast(Table, Event.__table__)
_INSERTED_EVENTS = (
    insert(_EVENT_TABLE)
    .from_select(
        ["job_id", "worker_id", "kind", "actor", "from_status", "to_status", "reason", "data", "created_at"],
        select(
            _events.c.job_id,
            _events.c.worker_id,
            _events.c.kind,
            _events.c.actor,
            _events.c.from_status,
            _events.c.to_status,
            _events.c.reason,
            sa_cast(_events.c.data, JSON),
            _events.c.at,
        ),
    )
    .returning(_EVENT_TABLE.c.id)
    .cte("new_event_ids")
)
SLOT_MOVES = precompiled.Statement(
    select(
        select(func.count()).select_from(_MOVED_ALLOCATIONS).scalar_subquery().label("allocations"),
        select(func.count()).select_from(_MOVED_POOLS).scalar_subquery().label("pools"),
        select(func.count()).select_from(_HOLDING).scalar_subquery().label("workers"),
        select(func.count()).select_from(_INSERTED_EVENTS).scalar_subquery().label("events"),
    )
)

# The counters a pass's new slots are taken against, locked until it ends: the jobs' allocations
# first, then the pools (the lock order of every slot move), in one statement.
_LOCKED_ALLOCATIONS = (
    select(
        Allocation.job_id.label("key"),
        (Allocation.slots - Allocation.bound).label("first"),
        (Allocation.max_slots - Allocation.slots).label("second"),
    )
    .where(Allocation.job_id == func.any(_array("job_ids", String)))
    .with_for_update()
    .cte("locked_allocations")
    .prefix_with("MATERIALIZED")
)
_LOCKED_POOLS = (
    select(
        sa_cast(ResourcePool.depth, String).label("key"),
        (ResourcePool.max_workers - ResourcePool.allocated).label("first"),
        _constant(0).label("second"),
    )
    .where(ResourcePool.depth == func.any(_array("depths", Integer)))
    .with_for_update()
    .cte("locked_pools")
    .prefix_with("MATERIALIZED")
)
ROOM = precompiled.Statement(
    union_all(
        select(_constant("job").label("kind"), *_LOCKED_ALLOCATIONS.c),
        select(_constant("depth").label("kind"), *_LOCKED_POOLS.c),
    )
)


@functools.cache
def claim(depths: tuple[int, ...]) -> precompiled.Statement:
    """The claim and the claimed jobs' IDLE workers in one statement: the candidates
    (claims._claim_candidates: each depth's first PENDING jobs, FOR UPDATE SKIP LOCKED) read
    once, as a MATERIALIZED CTE (a plain IN sub-select was rescanned per row and claimed more
    than asked), taken, and their workers inserted (ids as core/ids.py makes them: a prefix and
    12 random hex characters, here from gen_random_uuid). Returns the workers made."""
    candidates = _claim_candidates(depths, allocated=True, postgres=True).statement
    chosen = cast(Any, candidates).cte("candidates").prefix_with("MATERIALIZED")
    claimed = (
        update(_JOBS)
        # "Still unowned" as coalesce(engine_id, '') = '': as `engine_id IS NULL` the planner,
        # before the table has statistics (a new database, a burst of submits), walked
        # ix_jobs_engine_status over every unowned job instead of looking the candidates up by key.
        .where(_JOBS.c.id.in_(select(chosen.c.id)), func.coalesce(_JOBS.c.engine_id, "") == "")
        .values(engine_id=bindparam("b_engine"))
        .returning(_JOBS.c.id, _JOBS.c.worker_count, _JOBS.c.workspace_id, _JOBS.c.depth, _JOBS.c.agent)
        .cte("claimed")
    )
    each = select(
        *claimed.c, func.generate_series(0, claimed.c.worker_count - 1).label("worker_index")
    ).subquery("each_worker")
    random_hex = func.substr(func.replace(sa_cast(func.gen_random_uuid(), Text), "-", ""), 1, 12)
    rows = select(
        literal_column("'w_'", String).concat(random_hex),
        each.c.id,
        each.c.workspace_id,
        _constant(WorkerStatus.IDLE.value),
        each.c.worker_index,
        each.c.depth,
        each.c.agent,
        _constant(False),
        _constant(0),
        _constant(0),
        literal_column("0.0"),
        _constant(0),
        _constant(0),
        bindparam("now", type_=UTCDateTime()),
        bindparam("now", type_=UTCDateTime()),
    )
    return precompiled.Statement(
        insert(_WORKERS).from_select(list(WORKER_COLUMNS), rows).returning(_WORKERS.c.id, _WORKERS.c.job_id)
    )
