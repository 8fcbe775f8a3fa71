"""All job and event SQL."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db.locking import is_postgres
from orchestrator.db.models import Event, Job


def has_nul(*values: str | None) -> bool:
    """No id contains NUL, and PostgreSQL refuses it in a parameter: such a lookup finds nothing."""
    return any(v is not None and "\x00" in v for v in values)


async def get_job(session: AsyncSession, job_id: str) -> Job | None:
    if has_nul(job_id):
        return None
    stmt = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_jobs(
    session: AsyncSession,
    *,
    depth: int | None = None,
    status: str | None = None,
    parent_job_id: str | None = None,
    path_prefix: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Job], int]:
    if has_nul(status, parent_job_id, path_prefix):
        return [], 0
    conditions = []
    if depth is not None:
        conditions.append(Job.depth == depth)
    if status is not None:
        conditions.append(Job.status == status)
    if parent_job_id is not None:
        conditions.append(Job.parent_job_id == parent_job_id)
    if path_prefix is not None:
        conditions.append(Job.path.startswith(path_prefix, autoescape=True))
    total = (await session.execute(select(func.count()).select_from(Job).where(*conditions))).scalar_one()
    stmt = (
        select(Job)
        .where(*conditions)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
        .offset(offset)
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars()), total


async def lock_tree(session: AsyncSession, job: Job) -> bool:
    """Lock the root of `job`'s tree until the transaction ends, before a cancel reads the subtree
    and before a child submit reads its parent's status: of the two, the one that comes second sees
    what the first did (a cancel finds the new child; a submit finds its parent canceled). Both
    lock the root first, also before a budget check locks ancestors, so the order stays the same.
    PostgreSQL only (SQLite's BEGIN IMMEDIATE serializes writers already); returns whether it
    locked, in which case rows read before are read again."""
    if not is_postgres(session):
        return False
    root_id = job.path.split("/", 1)[0]
    # NO KEY UPDATE: exclusive among submits and cancels, yet no wait for a worker row inserted
    # under the root (a foreign key check takes KEY SHARE).
    await session.execute(select(Job.id).where(Job.id == root_id).with_for_update(key_share=True))
    return True


async def subtree(session: AsyncSession, job: Job) -> list[Job]:
    """The job and all its descendants, deepest first."""
    stmt = (
        select(Job)
        .where(Job.path.startswith(job.path, autoescape=True))
        .order_by(Job.depth.desc(), Job.created_at)
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars())


async def children(session: AsyncSession, job_id: str) -> Sequence[Job]:
    stmt = select(Job).where(Job.parent_job_id == job_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalars().all()


async def list_events(
    session: AsyncSession, job_ids: Sequence[str], *, after_id: int = 0, limit: int = 1000
) -> list[Event]:
    stmt = select(Event).where(Event.job_id.in_(job_ids), Event.id > after_id).order_by(Event.id).limit(limit)
    return list((await session.execute(stmt)).scalars())
