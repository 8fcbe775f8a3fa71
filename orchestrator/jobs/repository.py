"""All job and event SQL."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Row, Select, and_, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.ids import has_nul
from orchestrator.db import counts
from orchestrator.db.locking import is_postgres
from orchestrator.db.lookups import get_job as get_job
from orchestrator.db.models import Event, Job

# First key of the two-key advisory locks on job trees: keeps them apart from any other advisory
# lock a deployment's database may hold.
TREE_LOCK_NAMESPACE = 0x4A4F42  # "JOB"


@dataclass(frozen=True)
class JobFilter:
    """What the jobs list and its per-status counts are narrowed to (every field optional).

    `q` matches a substring of the id or the task text, case-insensitively, with `%` and `_`
    taken literally; `root_only` keeps the jobs with no parent, or for a subtree (a worker's
    token) the subtree's own root, so a page holds whole trees."""

    depth: int | None = None
    status: str | None = None
    parent_job_id: str | None = None
    path_prefix: str | None = None
    agent: str | None = None
    repository: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    q: str | None = None
    root_only: bool = False
    delegation_key: str | None = None

    def conditions(self, dialect: str | None = None) -> list[ColumnElement[bool]]:
        """The filter's WHERE conditions; `dialect`, if known, lets a subtree use its index."""
        conditions: list[ColumnElement[bool]] = []
        if self.depth is not None:
            conditions.append(Job.depth == self.depth)
        if self.status is not None:
            conditions.append(Job.status == self.status)
        if self.parent_job_id is not None:
            conditions.append(Job.parent_job_id == self.parent_job_id)
        if self.path_prefix is not None:
            conditions.append(in_subtree(self.path_prefix, dialect))
        if self.agent is not None:
            conditions.append(Job.agent == self.agent)
        if self.repository is not None:
            conditions.append(Job.repository == self.repository)
        if self.created_after is not None:
            conditions.append(Job.created_at >= self.created_after)
        if self.created_before is not None:
            conditions.append(Job.created_at < self.created_before)
        if self.q:
            conditions.append(
                or_(
                    Job.id.icontains(self.q, autoescape=True),
                    Job.task_description.icontains(self.q, autoescape=True),
                )
            )
        if self.delegation_key is not None:
            conditions.append(Job.delegation_key == self.delegation_key)
        if self.root_only:
            own_root = Job.path == self.path_prefix if self.path_prefix else Job.parent_job_id.is_(None)
            conditions.append(own_root)
        return conditions

    def finds_nothing(self) -> bool:
        return has_nul(
            self.status,
            self.parent_job_id,
            self.path_prefix,
            self.agent,
            self.repository,
            self.q,
            self.delegation_key,
        )


def in_subtree(path: str, dialect: str | None = None) -> ColumnElement[bool]:
    """Jobs whose path starts with `path` (a subtree). SQLite cannot answer `LIKE ... ESCAPE`
    from ix_jobs_path (it walks every job): there the same set is also given as the range of
    strings from `path` up to `path` with its last character's successor, which it searches in
    the index (exact under SQLite's byte order; the LIKE stays, so the set is the LIKE's)."""
    prefix = Job.path.startswith(path, autoescape=True)
    if dialect != "sqlite" or not path:
        return prefix
    return and_(prefix, Job.path >= path, Job.path < path[:-1] + chr(ord(path[-1]) + 1))


async def list_jobs(
    session: AsyncSession, where: JobFilter, *, limit: int = 50, offset: int = 0
) -> tuple[list[Row[Any]], int]:
    """A page of jobs (rows with a job's attributes) and how many match in all, both as of one
    snapshot: a job committed meanwhile is in both or in neither."""
    if where.finds_nothing():
        return [], 0
    remembers = counts.remembers(session)
    dialect = session.bind.dialect.name if session.bind is not None else None
    page, total_of, counted = _page_statements(where, limit, offset, dialect, remembers)
    key = ("jobs", where)
    if counted is not None:  # PostgreSQL: each statement its own snapshot
        if await counts.may_know(session, key):
            # The total remembered is the page's if it was counted at the page's version.
            rows = list((await session.execute(page)).all())
            total = await counts.known(session, key, getattr(rows[0], counts.VERSION) if rows else None)
            if total is not None:
                return rows, total
        rows, version, total = counts.counted_rows((await session.execute(counted)).all())
        await counts.remember(session, key, version, total)
        return rows, total
    if not remembers:  # a SQLite write transaction: one snapshot
        total = (await session.execute(total_of)).scalar_one()
        return list((await session.execute(page)).all()), total
    # The total is remembered while the database is unchanged (db/counts.py): the page's own
    # statement reads the data version it is compared with (SQLite: the read transaction's).
    rows = list((await session.execute(page)).all())
    read_at = getattr(rows[0], counts.VERSION) if rows else None
    return rows, await counts.count(session, total_of, key, read_at)


@functools.lru_cache(maxsize=256)
def _page_statements(
    where: JobFilter, limit: int, offset: int, dialect: str | None, versioned: bool
) -> tuple[Select[Any], Select[Any], Select[Any] | None]:
    """The page's statement (with the data version column if `versioned`), the total's, and on
    PostgreSQL the page with its total in one statement (db/counts.py's `counted_page`); built
    once per filter and window (a list polled with the same query costs no statement building)."""
    conditions = where.conditions(dialect)
    page = listing(*conditions).limit(limit).offset(offset)
    total = select(func.count()).select_from(Job).where(*conditions)
    counted = counts.counted_page(page, total, newest_first) if dialect == "postgresql" else None
    if versioned and dialect is not None:
        page = page.add_columns(counts.version_column(dialect))
    return page, total, counted


def newest_first(listed: FromClause) -> tuple[ColumnElement[Any], ...]:
    """The list's order over the jobs table or a subquery of its columns (a page's)."""
    return (listed.c.created_at.desc(), listed.c.id.desc())


def listing(*conditions: ColumnElement[bool]) -> Select[Any]:
    """Jobs newest first: a backward walk of ix_jobs_created_order, not a sort of the table.

    Rows of the table's columns, not ORM objects: a page is read to be serialised, and building
    50 identity-mapped instances cost more than the query and the serialisation together."""
    return listing_order(select(*Job.__table__.columns).where(*conditions))


def listing_order(statement: Select[Any]) -> Select[Any]:
    """`statement` (of the jobs table) newest first, ties by id: the list's one order."""
    return statement.order_by(*newest_first(Job.__table__))


async def count_by_status(session: AsyncSession, where: JobFilter) -> dict[str, int]:
    """Jobs per status under `where` (its own status ignored: the counts are the status filter's choices)."""
    if where.finds_nothing():
        return {}
    dialect = session.bind.dialect.name if session.bind is not None else None
    conditions = replace(where, status=None).conditions(dialect)
    stmt = select(Job.status, func.count()).where(*conditions).group_by(Job.status)
    return {str(status): int(count) for status, count in (await session.execute(stmt)).all()}


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


async def subtree_events(
    session: AsyncSession, job: Job, *, after_id: int = 0, limit: int = 1000
) -> list[Row[Any]]:
    """The events of `job`'s subtree after `after_id`, oldest first, as rows of the table's
    columns: one statement (the subtree's ids a subquery), no ORM objects (read to be answered)."""
    dialect = session.bind.dialect.name if session.bind is not None else None
    stmt = subtree_statement(job.path, dialect, after_id=after_id, limit=limit)
    return list((await session.execute(stmt)).all())


def subtree_statement(path: str, dialect: str | None, *, after_id: int, limit: int) -> Select[Any]:
    members = select(Job.id).where(in_subtree(path, dialect))
    table = Event.__table__
    return (
        select(*table.columns)
        .where(table.c.job_id.in_(members.scalar_subquery()), table.c.id > after_id)
        .order_by(table.c.id)
        .limit(limit)
    )
