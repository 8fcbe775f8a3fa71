"""Every statement the streams run: what a feed reads after its cursor, and the marks that say
something may have changed. Each runs in a short read transaction the caller holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import WORKER_FINAL
from orchestrator.db.models import Event, Job, Worker, WorkerLog

# The newest event id and log line id, which the change mark and the delivery horizon both read.
_NEWEST_IDS = "(SELECT coalesce(max(id), 0) FROM events), (SELECT coalesce(max(id), 0) FROM worker_logs)"
_MARK_COLUMNS = f"{_NEWEST_IDS}, (SELECT coalesce(sum(allocated), 0) FROM resource_pools)"
_CHANGE_MARK = text(f"SELECT {_MARK_COLUMNS}")
_CHANGE_MARK_PG = text(f"SELECT {_MARK_COLUMNS}, pg_current_snapshot()::text")
_HORIZON = text(f"SELECT {_NEWEST_IDS}, pg_current_snapshot()::text")


async def change_mark(session: AsyncSession, is_postgres: bool) -> tuple[Any, ...]:
    """(newest event id, newest log id, slots held[, pg_current_snapshot() on PostgreSQL])."""
    return tuple((await session.execute(_CHANGE_MARK_PG if is_postgres else _CHANGE_MARK)).one())


async def newest_ids_and_snapshot(session: AsyncSession) -> tuple[Any, ...]:
    """(newest event id, newest log id, pg_current_snapshot()): PostgreSQL only."""
    return tuple((await session.execute(_HORIZON)).one())


def _subtree(path: str) -> Any:
    return select(Job.id).where(Job.path.startswith(path, autoescape=True)).scalar_subquery()


async def subtree_events(session: AsyncSession, path: str, after: int, up_to: int, limit: int) -> list[Event]:
    stmt = (
        select(Event)
        .where(Event.job_id.in_(_subtree(path)), Event.id > after, Event.id <= up_to)
        .order_by(Event.id)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def subtree_logs(
    session: AsyncSession, path: str, after: int, up_to: int, limit: int
) -> list[WorkerLog]:
    stmt = (
        select(WorkerLog)
        .where(WorkerLog.job_id.in_(_subtree(path)), WorkerLog.id > after, WorkerLog.id <= up_to)
        .order_by(WorkerLog.id)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def subtree_statuses(session: AsyncSession, path: str) -> Sequence[tuple[str, str]]:
    """(job id, status) of every job of the subtree at `path`."""
    stmt = select(Job.id, Job.status).where(Job.path.startswith(path, autoescape=True))
    return (await session.execute(stmt)).tuples().all()


async def subtree_unfinished_workers(session: AsyncSession, path: str) -> int:
    """Workers of the subtree still running, or ended but still holding their slot."""
    stmt = (
        select(func.count())
        .select_from(Worker)
        .where(
            Worker.job_id.in_(_subtree(path)),
            (Worker.status.not_in([s.value for s in WORKER_FINAL])) | Worker.holds_slot.is_(True),
        )
    )
    return int((await session.execute(stmt)).scalar_one())


async def subtree_rows_after(session: AsyncSession, path: str, event_id: int, log_id: int) -> int:
    """Events after `event_id` plus log lines after `log_id` in the subtree, horizon or not."""
    events = (
        select(func.count()).select_from(Event).where(Event.job_id.in_(_subtree(path)), Event.id > event_id)
    )
    logs = (
        select(func.count())
        .select_from(WorkerLog)
        .where(WorkerLog.job_id.in_(_subtree(path)), WorkerLog.id > log_id)
    )
    return int((await session.execute(events)).scalar_one()) + int((await session.execute(logs)).scalar_one())


async def status_events(
    session: AsyncSession, kinds: Sequence[str], subtree_path: str | None, after: int, up_to: int, limit: int
) -> Sequence[tuple[Event, str | None, str, int]]:
    """(event, its job's parent id, path, depth) of the `kinds` events after `after`, in id order."""
    stmt = (
        select(Event, Job.parent_job_id, Job.path, Job.depth)
        .join(Job, Job.id == Event.job_id)
        .where(Event.id > after, Event.id <= up_to, Event.kind.in_(kinds))
        .order_by(Event.id)
        .limit(limit)
    )
    if subtree_path is not None:
        stmt = stmt.where(Job.path.startswith(subtree_path, autoescape=True))
    return (await session.execute(stmt)).tuples().all()


async def newest_event_id(session: AsyncSession) -> int:
    return int((await session.execute(select(func.coalesce(func.max(Event.id), 0)))).scalar_one())
