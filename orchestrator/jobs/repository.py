"""All job and event SQL."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db.locking import is_postgres
from orchestrator.db.models import Event, Job

# First key of the two-key advisory locks on job trees: keeps them apart from any other advisory
# lock a deployment's database may hold.
TREE_LOCK_NAMESPACE = 0x4A4F42  # "JOB"


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
    delegation_key: str | None = None,
) -> tuple[list[Job], int]:
    if has_nul(status, parent_job_id, path_prefix, delegation_key):
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
    if delegation_key is not None:
        conditions.append(Job.delegation_key == delegation_key)
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
    """Serialize the cancels and child submits of `job`'s tree until the transaction ends: each
    takes this lock before a cancel reads the subtree or a submit reads its parent's status, so
    the second of two sees what the first did (a cancel finds the new child; a submit finds its
    parent canceled; READ COMMITTED reads what committed before each statement).

    A transaction-scoped advisory lock keyed by the tree's root, not a lock on the root's row: the
    engine locks worker rows and then job rows, and takes no advisory lock, so it can never wait
    in a cycle with this. PostgreSQL only (SQLite's BEGIN IMMEDIATE serializes writers already);
    returns whether it locked, in which case rows read before are read again."""
    if not is_postgres(session):
        return False
    root_id = job.path.split("/", 1)[0]
    await session.execute(
        text("SELECT pg_advisory_xact_lock(:namespace, hashtext(:root))"),
        {"namespace": TREE_LOCK_NAMESPACE, "root": root_id},
    )
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
