"""The one place where a job's or a worker's status changes.

The transition table decides what is legal; a conditional UPDATE (`WHERE status = <what we read>`)
makes the change atomic, so of two racing requests exactly one wins and the other gets a 400.
Each change is recorded as an event in the same transaction.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.elements import BindParameter

from orchestrator.core.errors import InvalidTransition, NotFound
from orchestrator.core.states import (
    JOB_FINAL,
    JOB_TRANSITIONS,
    WORKER_FINAL,
    WORKER_TRANSITIONS,
    JobStatus,
    WorkerStatus,
)
from orchestrator.db import precompiled
from orchestrator.db.models import Job, Worker, utcnow
from orchestrator.db.unit_of_work import unit_of_work

Entity = TypeVar("Entity", Job, Worker)


async def transition_job(
    session: AsyncSession,
    job_id: str,
    target: JobStatus,
    *,
    actor: str,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
    known: Job | None = None,
) -> Job:
    return await _transition(session, Job, job_id, target, actor=actor, reason=reason, data=data, known=known)


async def transition_worker(
    session: AsyncSession,
    worker_id: str,
    target: WorkerStatus,
    *,
    actor: str,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
    known: Worker | None = None,
) -> Worker:
    return await _transition(
        session, Worker, worker_id, target, actor=actor, reason=reason, data=data, values=values, known=known
    )


async def _transition(
    session: AsyncSession,
    model: type[Entity],
    entity_id: str,
    target: JobStatus | WorkerStatus,
    *,
    actor: str,
    reason: str | None,
    data: dict[str, Any] | None,
    values: dict[str, Any] | None = None,
    known: Entity | None = None,
) -> Entity:
    """`known`: the caller's copy of the row (even from an earlier transaction), which saves the
    read; if it is stale the conditional UPDATE matches nothing and the change is refused."""
    is_job = model is Job
    name = "job" if is_job else "worker"
    table: dict[Any, frozenset[Any]] = JOB_TRANSITIONS if is_job else WORKER_TRANSITIONS
    final: frozenset[Any] = JOB_FINAL if is_job else WORKER_FINAL
    status_type: type[JobStatus] | type[WorkerStatus] = JobStatus if is_job else WorkerStatus

    entity = known if known is not None else await _load(session, model, entity_id)
    if entity is None:
        raise NotFound(f"{name.capitalize()} {entity_id} not found")
    current = status_type(entity.status)
    if target not in table[current]:
        raise InvalidTransition(name, entity_id, current.value, target.value)

    now = utcnow()
    changes: dict[str, Any] = {"status": target.value, "updated_at": now, "status_reason": reason}
    if target.value == "RUNNING" and entity.started_at is None:
        changes["started_at"] = now
    if target in final:
        changes["finished_at"] = now
    changes.update(values or {})
    result = await session.execute(
        update(model)
        .where(model.id == entity_id, model.status == current.value)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        # Someone else changed it between our read and our write: they won.
        fresh = await _load(session, model, entity_id)
        now_status = fresh.status if fresh is not None else "missing"
        raise InvalidTransition(name, entity_id, now_status, target.value)

    job_id = entity.job_id if isinstance(entity, Worker) else entity_id
    unit_of_work(session).record_event(
        job_id=job_id,
        worker_id=None if is_job else entity_id,
        kind=f"{name}.status",
        actor=actor,
        from_status=current.value,
        to_status=target.value,
        reason=reason,
        data=data,
        created_at=now,
    )
    for key, value in changes.items():  # what the UPDATE wrote, without reading it back
        set_committed_value(entity, key, value)
    return entity


async def _load(session: AsyncSession, model: type[Entity], entity_id: str) -> Entity | None:
    stmt = select(model).where(model.id == entity_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one_or_none()


class KnownRow(Protocol):
    """What a batched change reads of its row (a worker's also has `job_id`)."""

    id: str
    status: str
    started_at: datetime | None


class Change:
    """One status change of a batch: `known` is the row as read in this same transaction (an ORM
    object, or a `precompiled.Record` with `model` saying which table it is a row of)."""

    __slots__ = ("data", "known", "model", "reason", "target", "values")

    def __init__(
        self,
        known: KnownRow,
        target: JobStatus | WorkerStatus,
        reason: str | None,
        values: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        *,
        model: type[Job] | type[Worker] | None = None,
    ) -> None:
        self.known, self.target, self.reason, self.values, self.data = known, target, reason, values, data
        if model is None:
            if not isinstance(known, Job | Worker):
                raise TypeError("a Change of a plain row needs its model")
            model = type(known)
        self.model: type[Job] | type[Worker] = model


class StaleBatch(RuntimeError):
    """A batched change found a row that was not as read: the transaction must be rolled back."""


async def transition_many(session: AsyncSession, changes: list[Change], *, actor: str) -> None:
    """Apply many transitions with one UPDATE per shape of change instead of one per row.

    The same rules as `_transition`: the table decides what is legal (InvalidTransition, nothing
    written), and every UPDATE keeps its `WHERE status = <known>` guard. The caller read the rows
    in this transaction (on PostgreSQL with FOR UPDATE, see `lock_statuses`), so the guard always
    matches; if a row count says otherwise the whole batch raises StaleBatch.
    """
    if not changes:
        return
    work = unit_of_work(session)  # a read session or a stray one fails here, before any write
    now = utcnow()
    shapes: dict[tuple[type[Job] | type[Worker], tuple[str, ...]], list[dict[str, Any]]] = {}
    applied: list[tuple[Change, dict[str, Any]]] = []
    for change in changes:
        entity = change.known
        is_job = change.model is Job
        status_type: type[JobStatus] | type[WorkerStatus] = JobStatus if is_job else WorkerStatus
        table: dict[Any, frozenset[Any]] = JOB_TRANSITIONS if is_job else WORKER_TRANSITIONS
        final: frozenset[Any] = JOB_FINAL if is_job else WORKER_FINAL
        current = status_type(entity.status)
        if change.target not in table[current]:
            raise InvalidTransition(
                "job" if is_job else "worker", entity.id, current.value, change.target.value
            )
        values: dict[str, Any] = {
            "status": change.target.value,
            "updated_at": now,
            "status_reason": change.reason,
        }
        if change.target.value == "RUNNING" and entity.started_at is None:
            values["started_at"] = now
        if change.target in final:
            values["finished_at"] = now
        values.update(change.values or {})
        shape = (change.model, tuple(sorted(values)))
        shapes.setdefault(shape, []).append({**values, "b_id": entity.id, "b_status": current.value})
        applied.append((change, values))
    dialect = session.bind.dialect if session.bind else None
    exact = dialect.supports_sane_multi_rowcount if dialect is not None else False
    for (model, columns), rows in shapes.items():
        if dialect is not None and dialect.name == "postgresql":
            # One statement for the whole shape, with an exact row count (an executemany has
            # none on asyncpg): several rows as arrays, a lone row as itself.
            if len(rows) > 1:
                names = ("b_id", "b_status", *columns)
                arrays = {f"a_{name}": [row[name] for row in rows] for name in names}
                statement = _guarded_update_from_arrays(model, columns)
                changed = await precompiled.execute(session, statement, arrays)
            else:
                changed = await precompiled.execute(session, _guarded_update(model, columns), rows[0])
            exact_here = True
        else:
            changed = await precompiled.execute_many(session, _guarded_update(model, columns), rows)
            exact_here = exact
        if exact_here and changed != len(rows):
            raise StaleBatch(f"{len(rows) - changed} of {len(rows)} rows changed under a batch")
    for change, values in applied:
        entity = change.known
        is_worker = change.model is Worker
        work.record_event(
            job_id=cast(Worker, entity).job_id if is_worker else entity.id,  # a worker's row has it
            worker_id=entity.id if is_worker else None,
            kind="worker.status" if is_worker else "job.status",
            actor=actor,
            from_status=entity.status,
            to_status=change.target.value,
            reason=change.reason,
            data=change.data,
            created_at=now,
        )
        if isinstance(entity, precompiled.Record):
            for key, value in values.items():
                if key in entity._fields:
                    setattr(entity, key, value)
        else:
            for key, value in values.items():
                set_committed_value(entity, key, value)


@functools.cache
def _guarded_update(model: type[Job] | type[Worker], columns: tuple[str, ...]) -> precompiled.Statement:
    """The UPDATE for one shape of change, built once (a pass runs several)."""
    table = cast(Table, model.__table__)
    return precompiled.Statement(
        update(table)
        .where(table.c.id == bindparam("b_id"), table.c.status == bindparam("b_status"))
        .values({column: bindparam(column) for column in columns})
    )


@functools.cache
def _guarded_update_from_arrays(
    model: type[Job] | type[Worker], columns: tuple[str, ...]
) -> precompiled.Statement:
    """PostgreSQL: the same guarded UPDATE for many rows at once, `UPDATE … FROM unnest(arrays)`.
    An executemany runs (and, on the engine's connections, plans) the UPDATE once per row, and
    asyncpg reports no row count for it; one statement per shape does neither. Each row keeps its
    guard: it changes only where its id and the status as read both match."""
    table = cast(Table, model.__table__)
    names = ("b_id", "b_status", *columns)
    types = [table.c.id.type, table.c.status.type, *(table.c[name].type for name in columns)]
    arrays = (bindparam(f"a_{name}", type_=ARRAY(kind)) for name, kind in zip(names, types, strict=True))
    given = func.unnest(*arrays).table_valued(*names).render_derived(name="given")
    return precompiled.Statement(
        update(table)
        .where(table.c.id == given.c.b_id, table.c.status == given.c.b_status)
        .values({name: given.c[name] for name in columns})
    )


@functools.cache
def _statuses_of(model: type[Job] | type[Worker]) -> precompiled.Statement:
    ids: BindParameter[list[str]] = bindparam("ids", expanding=True)
    return precompiled.Statement(select(model.id, model.status).where(model.id.in_(ids)), lock=True)


async def lock_statuses(session: AsyncSession, model: type[Entity], ids: list[str]) -> dict[str, str]:
    """Current status of each row, locked until the transaction ends (db/locking.py)."""
    if not ids:
        return {}
    rows = await precompiled.fetch(session, _statuses_of(model), {"ids": ids})
    return {row_id: status for row_id, status in rows}
