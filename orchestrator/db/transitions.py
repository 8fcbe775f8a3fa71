"""The one place where a job's or a worker's status changes.

The transition table decides what is legal; a conditional UPDATE (`WHERE status = <what we read>`)
makes the change atomic, so of two racing requests exactly one wins and the other gets a 400.
Each change is recorded as an event in the same transaction.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from orchestrator.core.errors import InvalidTransition, NotFound
from orchestrator.core.states import (
    JOB_FINAL,
    JOB_TRANSITIONS,
    WORKER_FINAL,
    WORKER_TRANSITIONS,
    JobStatus,
    WorkerStatus,
)
from orchestrator.db.events import record_event
from orchestrator.db.models import Job, Worker, utcnow

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
    record_event(
        session,
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
