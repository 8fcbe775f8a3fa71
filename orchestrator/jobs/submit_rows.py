"""The rows a submit writes (job, allocation, a new workspace), held until the statements that
write them can carry every submit of a group commit at once (jobs/group_commit.py).

Precompiled INSERTs (db/precompiled), not the ORM's unit of work: submit is the API's hottest
write, and a flush costs more CPU than the statements. A submit that reads rows (a child, one
with a repository) flushes the rows held before it first, so it sees every earlier submit of
its transaction as it would have seen them committed.
"""

from __future__ import annotations

import json
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Float,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    func,
    insert,
    literal,
    literal_column,
    null,
    select,
)
from sqlalchemy import cast as sa_cast
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.core.states import JobStatus
from orchestrator.db import precompiled
from orchestrator.db.locking import is_postgres
from orchestrator.db.models import Allocation, Event, Job, UTCDateTime, Workspace
from orchestrator.db.precompiled import Record, record_type
from orchestrator.db.topics import CHANNEL, Topic
from orchestrator.db.unit_of_work import UnitOfWork

JOB_COLUMNS = (
    "id",
    "status",
    "task_description",
    "worker_count",
    "depth",
    "parent_job_id",
    "path",
    "priority",
    "agent",
    "agent_options",
    "timeout_seconds",
    "repository",
    "base_ref",
    "workspace_id",
    "created_by",
    "created_by_worker_id",
    "max_cost_usd",
    "max_turns",
    "delegation_key",
    "limits",
    "created_at",
    "updated_at",
)
_JOB_VALUES = {name: bindparam(name, type_=Job.__table__.c[name].type) for name in JOB_COLUMNS}
_JOB_ROW = insert(Job).values(_JOB_VALUES)
_ALLOCATION_ROW = insert(Allocation).values(
    job_id=bindparam("id", type_=Allocation.__table__.c.job_id.type),
    depth=bindparam("a_depth", type_=Allocation.__table__.c.depth.type),
    slots=0,
    bound=0,
    max_slots=bindparam("a_max_slots", type_=Allocation.__table__.c.max_slots.type),
    updated_at=bindparam("a_updated_at", type_=Allocation.__table__.c.updated_at.type),
)
_WORKSPACE_ROW = insert(Workspace).values(
    id=bindparam("w_id", type_=Workspace.__table__.c.id.type),
    repository=bindparam("w_repository", type_=Workspace.__table__.c.repository.type),
    root_job_id=bindparam("w_root_job_id", type_=Workspace.__table__.c.root_job_id.type),
    created_at=bindparam("w_created_at", type_=Workspace.__table__.c.created_at.type),
)
_INSERT_JOB = precompiled.Statement(_JOB_ROW)
_INSERT_ALLOCATION = precompiled.Statement(_ALLOCATION_ROW)
_INSERT_WORKSPACE = precompiled.Statement(_WORKSPACE_ROW)
# PostgreSQL, one submit, by whether its workspace is new and whether the statement notifies:
# its rows and UnitOfWork.publish's pg_notify in one statement (the allocation's foreign key to
# the job is checked at the statement's end). The group commit's statements do not notify: it
# tells the other processes after the commit (Database.notify_committed says why).
_SUBMIT_PG = {
    (new_workspace, notify): select(
        func.pg_notify(bindparam("channel"), bindparam("topic")) if notify else literal(1)
    ).add_cte(
        *([_WORKSPACE_ROW.cte("new_workspace")] if new_workspace else []),
        _JOB_ROW.cte("new_job"),
        _ALLOCATION_ROW.cte("new_allocation"),
    )
    for new_workspace in (False, True)
    for notify in (False, True)
}

# PostgreSQL, plain root jobs (jobs/submit.is_plain_root): a batch's rows and their "submitted"
# events in one statement whatever its size, the values as one array per column (`unnest`): the
# server plans and runs one INSERT per table for the batch, not four per job (issue 19: its CPU
# per submit is what a second API process competes with). Each event takes its id (a sequence)
# from a row new_job returns, so after the job's INSERT gave the transaction its id
# (UnitOfWork._take_transaction_id says why that order matters). Values are the same as the
# single-row statements write: `Job`'s JSON columns as JSON text (None is JSON null, as
# SQLAlchemy's JSON type writes it).
_ROOT_ARRAYS: dict[str, Any] = {
    "id": String,
    "task_description": Text,
    "worker_count": Integer,
    "depth": Integer,
    "path": String,
    "priority": Integer,
    "agent": String,
    "agent_options": Text,
    "timeout_seconds": Float,
    "workspace_id": String,
    "created_by": String,
    "created_by_worker_id": String,
    "max_cost_usd": Float,
    "max_turns": Integer,
    "delegation_key": String,
    "limits": Text,
    "created_at": UTCDateTime(),
    "e_actor": String,
}
_JSON_COLUMNS = ("agent_options", "limits")
_root_values = (
    func.unnest(*(bindparam(f"r_{name}", type_=ARRAY(item)) for name, item in _ROOT_ARRAYS.items()))
    .table_valued(*_ROOT_ARRAYS)
    .render_derived(name="root_values", with_types=False)
)
_roots = select(*_root_values.c).cte("roots")  # read by four statements, unnested once
_JOBS = cast(Table, Job.__table__)
_ROOT_JOB_VALUES = {
    "status": literal_column(f"'{JobStatus.PENDING.value}'"),
    "parent_job_id": null(),
    "repository": null(),
    "base_ref": null(),
    "updated_at": _roots.c.created_at,
} | {name: sa_cast(_roots.c[name], JSON) for name in _JSON_COLUMNS}
_NEW_ROOT_JOBS = (
    insert(_JOBS)
    .from_select(
        list(JOB_COLUMNS),
        select(
            *(_ROOT_JOB_VALUES[name] if name in _ROOT_JOB_VALUES else _roots.c[name] for name in JOB_COLUMNS)
        ),
    )
    .returning(_JOBS.c.id)
    .cte("new_job")
)
_NEW_ROOTS_PG = (
    insert(Event)
    .from_select(
        ["job_id", "kind", "actor", "to_status", "reason", "data", "created_at"],
        select(
            _roots.c.id,
            literal_column("'job.status'"),
            _roots.c.e_actor,
            literal_column(f"'{JobStatus.PENDING.value}'"),
            literal_column("'submitted'"),
            literal_column("'null'::json"),  # no data, as a unit of work's events write it
            _roots.c.created_at,
        ).where(_roots.c.id == _NEW_ROOT_JOBS.c.id),
    )
    .add_cte(
        _roots,
        insert(Workspace)
        .from_select(
            ["id", "repository", "root_job_id", "created_at"],
            select(_roots.c.workspace_id, null(), _roots.c.id, _roots.c.created_at),
        )
        .cte("new_workspace"),
        _NEW_ROOT_JOBS,
        insert(Allocation)
        .from_select(
            ["job_id", "depth", "slots", "bound", "max_slots", "updated_at"],
            select(
                _roots.c.id,
                _roots.c.depth,
                literal_column("0"),
                literal_column("0"),
                _roots.c.worker_count,
                _roots.c.created_at,
            ),
        )
        .cte("new_allocation"),
    )
)


# Compiled once, here: sent as SQL text with its arrays, the statement needs none of SQLAlchemy's
# per-execution work for a compiled one (its cache look-up, each array element through its
# type's bind processing), which cost the API more CPU per batch than the batch's rows (issue 19).
_NEW_ROOTS_COMPILED = _NEW_ROOTS_PG.compile(dialect=PGDialect_asyncpg())  # type: ignore[no-untyped-call]
assert _NEW_ROOTS_COMPILED.positiontup == [f"r_{name}" for name in _ROOT_ARRAYS]
_NEW_ROOTS_SQL = str(_NEW_ROOTS_COMPILED)


async def write_plain_roots(connection: AsyncConnection, jobs: list[tuple[dict[str, Any], str]]) -> None:
    """Write plain root jobs (`JOB_COLUMNS`, the submitting actor's name) with their rows and
    events on a connection in autocommit: one statement, so one transaction (every job is
    written, or none). An error the server answered with means none was; any other (a lost
    connection) leaves it unknown."""
    arrays: list[list[Any]] = [[] for _ in _ROOT_ARRAYS]
    for job, actor in jobs:
        for column, name in zip(arrays, _ROOT_ARRAYS, strict=True):
            value = actor if name == "e_actor" else job[name]
            column.append(json.dumps(value) if name in _JSON_COLUMNS else value)
    await connection.exec_driver_sql(_NEW_ROOTS_SQL, tuple(arrays))


def _row(job: dict[str, Any], *, new_workspace: bool) -> dict[str, Any]:
    """The parameters of a job's rows: its own, its allocation's, a new workspace's."""
    now = job["created_at"]
    row = job | {"a_depth": job["depth"], "a_max_slots": job["worker_count"], "a_updated_at": now}
    if new_workspace:
        row |= {
            "w_id": job["workspace_id"],
            "w_repository": job["repository"],
            "w_root_job_id": job["id"],
            "w_created_at": now,
        }
    return row


# A submitted job as written: every column of `jobs` (those a submit leaves NULL are None). The
# response's source, without an ORM instance's cost (a tenth of a submit's CPU).
_SubmittedJob = record_type(list(Job.__table__.columns))


def submitted_job(values: dict[str, Any]) -> Record:
    """The job whose `JOB_COLUMNS` are `values`, as a row with attribute access."""
    return _SubmittedJob([values.get(name) for name in _SubmittedJob._fields])


class PendingRows:
    """The rows of a transaction's submits, not yet written: `flush` writes them (on SQLite an
    executemany per table; on PostgreSQL each submit's rows and NOTIFY as one statement, all
    of them in one executemany: one round trip instead of four)."""

    def __init__(self, session: UnitOfWork, *, notify: bool = True) -> None:
        self.session = session
        # PostgreSQL: NOTIFY in the transaction; False if the caller tells the other processes
        # after the commit itself (jobs/group_commit.py).
        self.notify = notify
        self.rows: list[dict[str, Any]] = []
        self.new_workspaces = 0

    def add(self, job: dict[str, Any], new_workspace: bool) -> None:
        """Hold the rows of a job (its `JOB_COLUMNS`), and of its workspace if that is new."""
        self.rows.append(_row(job, new_workspace=new_workspace))
        self.new_workspaces += new_workspace

    async def flush(self) -> None:
        rows, new_workspaces = self.rows, self.new_workspaces
        if not rows:
            return
        self.rows, self.new_workspaces = [], 0
        session = self.session
        if is_postgres(session):
            # One round trip for the rows: a data-modifying WITH runs every INSERT, once per
            # submit in one executemany (asyncpg sends them together). Its first insert gives
            # the transaction its id before the event rows take sequence values at commit
            # (UnitOfWork.commit), so that statement is not needed.
            notice = {"channel": CHANNEL, "topic": Topic.JOBS.value} if self.notify else {}
            for new_workspace in (True, False):
                statement = _SUBMIT_PG[new_workspace, self.notify]
                group = [row | notice for row in rows if ("w_id" in row) == new_workspace]
                if len(group) == 1:
                    await session.execute(statement, group[0])
                elif group:
                    await (await session.connection()).execute(statement, group)
            session.published_by_statement(Topic.JOBS)
            return
        if new_workspaces:
            await precompiled.execute_many(session, _INSERT_WORKSPACE, [r for r in rows if "w_id" in r])
        await precompiled.execute_many(session, _INSERT_JOB, rows)
        await precompiled.execute_many(session, _INSERT_ALLOCATION, rows)
        await session.publish(Topic.JOBS)
