"""`GET /api/jobs` pages as JSON bytes: read as plain rows, written without a model, remembered
until the database changes.

A page of 50 jobs was validated into JobOut models from rows the database had just given (its
own writes, validated at submit) and dumped again, its SQLite times parsed into datetimes only to
be printed back: most of the request's CPU. Here a row's values go straight to pydantic-core's
JSON writer (`pydantic_core.to_json`: the same writer JobOut's serializer uses, so the same bytes:
tests/integration/test_job_pages.py compares them for every kind of field, on both databases),
the columns in JobOut's order, SQLite's times turned into JSON's text by slicing.

And a page is remembered, per the data version it was read at (db/counts.py), under the exact
filter it was read with (the actor's subtree included: a worker token's filter holds its tree's
path), its window and nothing else. The next request reads the version first, outside its
session (db/version_reads.py: PostgreSQL's snapshot in a read shared by the requests that came
before it was sent, a SQLite file's data version on a connection of the process's own), and,
while nothing anywhere committed since, answers the same bytes without a connection of its own.
When a page did change, the requests that find it so at the same version share one read of it.
A job has no field that changes with time alone, so nothing in a page goes stale but by a commit.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import pydantic_core
from sqlalchemy import JSON, DateTime, Select, String, Text, bindparam, func, select, type_coerce
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.ids import has_nul
from orchestrator.db import counts, version_reads
from orchestrator.db.lookups import check_visible
from orchestrator.db.models import Job, UTCDateTime, _sqlite_datetime
from orchestrator.db.precompiled import Statement, StatementSession, fetch, fetch_tuples
from orchestrator.jobs.repository import JobFilter, listing_order, newest_first
from orchestrator.jobs.schemas import JobOut

# JobOut's fields in order: a row is zipped with them into the page's dicts.
FIELDS: tuple[str, ...] = tuple(JobOut.model_fields)
_TIMES = tuple(i for i, name in enumerate(FIELDS) if isinstance(Job.__table__.c[name].type, UTCDateTime))
_JSONS = tuple(i for i, name in enumerate(FIELDS) if isinstance(Job.__table__.c[name].type, JSON))
# Pages remembered per SQLite connection or PostgreSQL database; the oldest go first. A page of
# 1,000 jobs with long tasks is large: only pages up to MAX_REMEMBERED_BYTES are kept.
MAX_REMEMBERED = 64
MAX_REMEMBERED_BYTES = 256 * 1024
_by_database: dict[str, dict[Hashable, tuple[str, bytes]]] = {}


def _columns(dialect: str) -> list[Any]:
    """JobOut's columns. SQLite's times and JSON as their stored text (turned into JSON's values
    here, in one pass per row), PostgreSQL's times as asyncpg's UTC datetimes (UTCDateTime's
    result processing would only make them again)."""
    columns: list[Any] = []
    for name in FIELDS:
        column = Job.__table__.c[name]
        if isinstance(column.type, UTCDateTime):
            as_type: Any = String() if dialect == "sqlite" else DateTime(timezone=True)
            column = type_coerce(column, as_type).label(name)
        elif isinstance(column.type, JSON) and dialect == "sqlite":
            column = type_coerce(column, Text()).label(name)
        columns.append(column)
    return columns


@functools.lru_cache(maxsize=256)
def _statements(
    where: JobFilter, limit: int, offset: int, dialect: str, versioned: bool
) -> tuple[Statement, Select[Any], Statement, Statement | None]:
    """The page's statement (with the data version column if `versioned`), the total's, the
    data version's alone, and on PostgreSQL the page with its total in one statement
    (db/counts.py's `counted_page`: one snapshot); built once per filter and window."""
    conditions = where.conditions(dialect)
    page = listing_order(select(*_columns(dialect)).where(*conditions)).limit(limit).offset(offset)
    total = select(func.count()).select_from(Job).where(*conditions)
    counted = Statement(counts.counted_page(page, total, newest_first)) if dialect == "postgresql" else None
    if versioned:
        page = page.add_columns(counts.version_column(dialect))
    return Statement(page), total, Statement(select(counts.version_column(dialect))), counted


@functools.lru_cache(maxsize=4)
def _one_statement(dialect: str) -> Statement:
    """A job's JobOut columns and its path (the last column), by id."""
    table = Job.__table__
    return Statement(select(*_columns(dialect), table.c.path).where(table.c.id == bindparam("job_id")))


async def job_json(session: AsyncSession, actor: Actor, job_id: str) -> bytes:
    """The JobOut body of a job the actor may see, byte for byte what JobOut's serializer writes
    (as a page's jobs are: no model validated and dumped again); NotFound or Forbidden else."""
    dialect = session.bind.dialect.name if session.bind is not None else ""
    rows = [] if has_nul(job_id) else await fetch_tuples(session, _one_statement(dialect), {"job_id": job_id})
    check_visible(actor, job_id, rows[0][-1] if rows else None)
    return pydantic_core.to_json(_row_maker(dialect)(rows[0]))


def _sqlite_time(text: str) -> Any:
    """SQLite's "2026-11-27 12:30:15.123456" as pydantic writes the datetime it stands for:
    "2026-11-27T12:30:15.123456Z" (no fraction when it is zero); any other form parsed."""
    if len(text) == 26 and text[10] == " " and text[19] == ".":
        fraction = text[19:] if text[20:] != "000000" else ""
        return f"{text[:10]}T{text[11:19]}{fraction}Z"
    return _sqlite_datetime(text)


def _sqlite_json(text: str | None) -> Any:
    if text == "{}":  # most jobs' options
        return {}
    return None if text is None else json.loads(text)


def _row_maker(dialect: str) -> Callable[[Sequence[Any]], dict[str, Any]]:
    if dialect != "sqlite":
        return lambda row: dict(zip(FIELDS, row))  # noqa: B905 (the version column is left off)

    def make(row: Sequence[Any]) -> dict[str, Any]:
        values = list(row)
        for i in _TIMES:
            if values[i] is not None:
                values[i] = _sqlite_time(values[i])
        for i in _JSONS:
            values[i] = _sqlite_json(values[i])
        return dict(zip(FIELDS, values))  # noqa: B905 (the version column is left off)

    return make


def render(rows: Sequence[Sequence[Any]], total: int, limit: int, offset: int, dialect: str) -> bytes:
    """The JobList body of `rows` (the page statement's rows), byte for byte what JobList's
    serializer writes."""
    make = _row_maker(dialect)
    body = {"jobs": [make(row) for row in rows], "total": total, "limit": limit, "offset": offset}
    return pydantic_core.to_json(body)


def _remembered(
    session: AsyncSession, dialect: str, watched: bool
) -> dict[Hashable, tuple[str, bytes]] | None:
    """The pages remembered for this session's database (PostgreSQL), its process's watching
    connection (SQLite, `watched`: db/version_reads.py) or its connection (SQLite: its
    transaction begun, by a statement on the driver), None where a connection cannot keep them."""
    if dialect == "postgresql":
        assert session.bind is not None  # Database's sessions are bound to its engine
        key = session.bind.url.render_as_string(hide_password=False)  # type: ignore[union-attr]
        return _by_database.setdefault(key, {})
    if watched:
        watching = version_reads.watcher(session.bind)  # type: ignore[arg-type]
        assert watching is not None  # it gave the version
        pages: dict[Hashable, tuple[str, bytes]] = watching.remembered.setdefault("orchestrator_pages", {})
        return pages
    driver = session.sqlite_driver if isinstance(session, StatementSession) else None
    if driver is None or driver.connection is None:
        return None
    found: dict[Hashable, tuple[str, bytes]] = driver.connection.info.setdefault("orchestrator_pages", {})
    return found


async def _version(session: AsyncSession, version_of: Statement) -> str:
    return str(getattr((await fetch(session, version_of))[0], counts.VERSION))


async def page_json(session: AsyncSession, where: JobFilter, *, limit: int, offset: int) -> bytes:
    """The JobList body of a page of jobs under `where` (already confined to the actor's subtree)."""
    dialect = session.bind.dialect.name if session.bind is not None else ""
    if where.finds_nothing():
        return render([], 0, limit, offset, dialect)
    if not counts.remembers(session):
        page, total_of, _, counted = _statements(where, limit, offset, dialect, False)
        if counted is not None:
            rows, _, total = counts.counted_rows(await fetch_tuples(session, counted))
            return render(rows, total, limit, offset, dialect)
        total = int((await session.execute(total_of)).scalar_one())
        return render(await fetch_tuples(session, page), total, limit, offset, dialect)
    key = (where, limit, offset)
    # The database's version read before anything else, outside the session: a remembered page
    # is answered without a connection. Else (SQLite in memory or busy) the version of the
    # session's connection, read first, in the transaction's snapshot (it begins it, and keeps
    # the connection whose pages these are).
    if dialect == "postgresql":  # nothing remembered: no version to compare (the page holds its own)
        remembered = _remembered(session, dialect, False)
        if remembered is None or key not in remembered:
            return await _read(session, key, None, remembered, False)
    # SQLite: not when the session's transaction has begun (a worker's token was checked in it):
    # its snapshot may be older than the version read now.
    begun = dialect == "sqlite" and session.in_transaction()
    now = None if begun else await counts.database_version(session)
    watched = now is not None and dialect == "sqlite"
    if now is None:
        now = await _version(session, _statements(where, limit, offset, dialect, True)[2])
    remembered = _remembered(session, dialect, watched)
    found = remembered.get(key) if remembered is not None else None
    if found is not None and found[0] == now:
        return found[1]
    if not watched and dialect == "sqlite":  # versions of this connection only: nothing to share
        return await _read(session, key, now, remembered, watched)
    return await _read_shared(session, key, now, remembered, watched)


# Reads of a page in flight, by (database, page, version): a read begun after a version read
# gave X holds every commit in X, so every request that read X (after it arrived) may share it.
# When many requests find their page changed at once they make one read, not one each.
_reading: dict[Hashable, asyncio.Future[bytes]] = {}


async def _read_shared(
    session: AsyncSession,
    key: tuple[JobFilter, int, int],
    now: str,
    remembered: dict[Hashable, tuple[str, bytes]] | None,
    watched: bool,
) -> bytes:
    reading_key = (id(remembered), key, now)
    reading = _reading.get(reading_key)
    if reading is not None:
        try:
            return await asyncio.shield(reading)
        except asyncio.CancelledError:
            if not reading.cancelled():
                raise  # this request's own cancellation
        # The request that read ended before it answered: read again.
        return await _read(session, key, now, remembered, watched)
    reading = _reading[reading_key] = asyncio.get_running_loop().create_future()
    reading.add_done_callback(_retrieved)
    try:
        body = await _read(session, key, now, remembered, watched)
    except BaseException as exc:
        if isinstance(exc, Exception):
            reading.set_exception(exc)
        else:
            reading.cancel()
        raise
    finally:
        del _reading[reading_key]
    reading.set_result(body)
    return body


def _retrieved(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()


async def _read(
    session: AsyncSession,
    key: tuple[JobFilter, int, int],
    now: str | None,
    remembered: dict[Hashable, tuple[str, bytes]] | None,
    watched: bool,
) -> bytes:
    """The page read in `session`, and remembered."""
    where, limit, offset = key
    dialect = session.bind.dialect.name if session.bind is not None else ""
    page, total_of, _, counted = _statements(where, limit, offset, dialect, True)
    total_key = ("jobs", where)
    total: int | None = None
    # PostgreSQL: the page alone first only if the total remembered may be the page's.
    if counted is None or await counts.may_know(session, total_key, now):
        rows = await fetch_tuples(session, page)
        # The page's own statement read the version it holds, its last column (SQLite: the
        # transaction's snapshot, the count's key). A page of a watched SQLite file is
        # remembered at the version read before it: its snapshot is that or newer.
        version = str(rows[0][-1]) if rows else None
        total = await counts.known(session, total_key, version)
        if total is None and counted is None:
            total = await counts.count(session, total_of, total_key, version)
    if total is None:
        # PostgreSQL, the total not counted at the page's version: both again in one snapshot.
        assert counted is not None
        rows, version, total = counts.counted_rows(await fetch_tuples(session, counted))
        await counts.remember(session, total_key, version, total)
    body = render(rows, total, limit, offset, dialect)
    keep = now if watched else version
    if remembered is not None and keep is not None and len(body) <= MAX_REMEMBERED_BYTES:
        remembered.pop(key, None)
        remembered[key] = (keep, body)
        while len(remembered) > MAX_REMEMBERED:
            del remembered[next(iter(remembered))]
    return body
