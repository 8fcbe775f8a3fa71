"""Exact counts, remembered until the database changes.

A list page's `total` is a COUNT over every matching row: at 100,000 jobs it cost more than the
rest of the request together (most of a PostgreSQL core at a few hundred pages a second), and it
is the same figure from one request to the next while nothing is written. So a read session
remembers it, keyed by a *data version* that moves with every change any connection or process
commits, and counts again only when the version moved:

* PostgreSQL: the statement's snapshot (`pg_current_snapshot()`: xmax and the transactions in
  progress). Two snapshots with the same text see exactly the same committed rows; any commit
  anywhere (it ends a transaction in progress, or raises xmax) makes a new text.
* SQLite: per connection (the versions are the connection's own), `PRAGMA data_version`, which
  moves when another connection or process commits, and `total_changes()`, which moves when
  this connection changes a row.

Only read sessions use it: a transaction that has written sees its own uncommitted rows, which
its snapshot's text does not show. The version is read in the page's own statement (one more
column, no round trip) where a caller can; `version_column` gives that column.

A page and its total are one snapshot's: on SQLite a read transaction's; on PostgreSQL, where
each statement of a read session has a snapshot of its own, the page alone is read first only
when a total remembered may match its version, and otherwise page and total are read by one
statement (`counted_page`, `counted_entities`).

`database_version` reads a version without the request's session, for a request that may need
no connection at all (a remembered page): on PostgreSQL one read of the snapshot serves every
request that arrived before it was sent (db/version_reads.py), on a SQLite file a connection of
the process's own that only reads `PRAGMA data_version`, which moves whenever any other
connection, this process's included, commits.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, Subquery, literal_column, select, true
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import aliased

from orchestrator.db import version_reads
from orchestrator.db.precompiled import StatementSession

VERSION = "data_version_"
TOTAL = "total_"
_PG_VERSION = "(SELECT pg_current_snapshot()::text)"
_SQLITE_VERSION = "(SELECT total_changes() || ':' || data_version FROM pragma_data_version())"
# Counts remembered per database (PostgreSQL) or per connection (SQLite); the oldest go first.
MAX_REMEMBERED = 256

_by_database: dict[str, dict[Hashable, tuple[str, int]]] = {}


def _dialect(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else ""


def remembers(session: AsyncSession) -> bool:
    """Whether counts in this session may be remembered (a read session, a known database)."""
    return (
        isinstance(session, StatementSession)
        and session.read_only
        and _dialect(session) in ("postgresql", "sqlite")
    )


def version_column(dialect: str) -> ColumnElement[Any]:
    """The data version as a column (`VERSION`) to add to a statement of a read session."""
    return literal_column(_PG_VERSION if dialect == "postgresql" else _SQLITE_VERSION).label(VERSION)


async def database_version(session: AsyncSession) -> str | None:
    """The data version of the session's database, read without the session (see
    db/version_reads.py): every commit that ended before this call is in it. None where it
    cannot be read so (SQLite in memory, or busy): read it in the session then. On SQLite it is
    the process's own version, not comparable with `version_column`'s."""
    bind = session.bind
    if not isinstance(bind, AsyncEngine):
        return None
    dialect = bind.dialect.name
    if dialect == "postgresql":
        return await version_reads.shared_reads(bind).read()
    if dialect == "sqlite":
        watching = version_reads.watcher(bind)
        return watching.version() if watching is not None else None
    return None


async def _remembered(session: AsyncSession) -> dict[Hashable, tuple[str, int]]:
    if _dialect(session) == "postgresql":
        bind = session.bind
        assert isinstance(bind, AsyncEngine)  # Database's sessions are bound to its engine
        key = bind.url.render_as_string(hide_password=False)
        return _by_database.setdefault(key, {})
    driver = session.sqlite_driver if isinstance(session, StatementSession) else None
    if driver is not None and driver.connection is not None:  # the transaction's, kept (cheaper)
        info = driver.connection.info
    else:
        info = (await session.connection()).info
    found: dict[Hashable, tuple[str, int]] = info.setdefault("orchestrator_counts", {})
    return found


async def known(session: AsyncSession, key: Hashable, version: str | None) -> int | None:
    """The total remembered under `key` if it was counted at `version`, else None."""
    if version is None or not remembers(session):
        return None
    found = (await _remembered(session)).get(key)
    return found[1] if found is not None and found[0] == version else None


async def counted_before(session: AsyncSession, key: Hashable) -> bool:
    """Whether a total is remembered under `key` at any version (one may be still good)."""
    return remembers(session) and key in await _remembered(session)


async def may_know(session: AsyncSession, key: Hashable, now: str | None = None) -> bool:
    """Whether the total remembered under `key` may be that of a page read next: counted at
    `now`, the database's version read just before, if the caller read one (a snapshot never
    comes back to an older one, so a total counted at another version cannot be the page's);
    else any total remembered may be. Not read here: a version read costs about what the page
    read it might save (bench/listing_cpu.py)."""
    if not await counted_before(session, key):
        return False
    return now is None or await known(session, key, now) is not None


async def remember(session: AsyncSession, key: Hashable, version: str, total: int) -> None:
    """Remember `total` as counted under `key` at `version` (nothing, outside a read session)."""
    if not remembers(session):
        return
    remembered = await _remembered(session)
    remembered.pop(key, None)
    remembered[key] = (version, total)
    while len(remembered) > MAX_REMEMBERED:
        del remembered[next(iter(remembered))]


async def count(session: AsyncSession, statement: Select[Any], key: Hashable, version: str | None) -> int:
    """The single value of `statement` (a COUNT), from memory if it was counted at `version`
    (the session's data version, None if not read yet) under the same `key` (which must
    identify the statement exactly). For SQLite, whose read session is one snapshot: on
    PostgreSQL a page is counted with `counted_page`."""
    if not remembers(session):
        return int((await session.execute(statement)).scalar_one())
    found = await known(session, key, version)
    if found is not None:
        return found
    # One snapshot for the whole read transaction; the COUNT alone keeps SQLite's fast path for
    # a whole table (it counts index pages instead of visiting rows).
    if version is None:
        version = (await session.execute(select(version_column(_dialect(session))))).scalar_one()
    total = (await session.execute(statement)).scalar_one()
    await remember(session, key, str(version), int(total))
    return int(total)


def counted_page(
    page: Select[Any], total: Select[Any], order: Callable[[Subquery], Sequence[ColumnElement[Any]]]
) -> Select[Any]:
    """PostgreSQL: the rows of `page`, each followed by the data version and the value of
    `total` (a COUNT), in one statement. A page and its total read by two statements are read
    in two snapshots (a read session's statements run in autocommit; a write transaction's
    under READ COMMITTED), so a job committed between them showed in the total and not in the
    page. An empty page is one row of NULLs followed by the version and the total (an outer
    join: the total is there whatever the page holds); `counted_rows` takes them apart.
    `order` gives the page's order again over the page's columns (an outer query keeps no
    order of its own)."""
    counted = total.add_columns(version_column("postgresql")).subquery("counted")
    total_of, version_of = counted.c
    listed = page.subquery("page")
    return (
        select(*listed.c, version_of, total_of.label(TOTAL))
        .select_from(counted.outerjoin(listed, true()))
        .order_by(*order(listed))
    )


def counted_entities(
    entity: type[Any],
    page: Select[Any],
    total: Select[Any],
    order: Callable[[Any], Sequence[ColumnElement[Any]]],
) -> Select[Any]:
    """`counted_page` for a page of ORM entities (`page` selects `entity`, then perhaps more
    labelled columns): rows of the entity (None for an empty page's row), the page's other
    columns, and the total last. `order` is given the entity aliased to the page."""
    counted = total.subquery("counted")
    listed = page.subquery("page")
    row = aliased(entity, listed)
    own = {column.key for column in sa_inspect(entity).columns}
    more = [column for column in listed.c if column.key not in own]
    (total_of,) = counted.c
    return (
        select(row, *more, total_of.label(TOTAL))
        .select_from(counted.outerjoin(listed, true()))
        .order_by(*order(row))
        .execution_options(populate_existing=True)
    )


def counted_rows(rows: Sequence[Any]) -> tuple[list[Any], str, int]:
    """The page's rows of a `counted_page` statement (an empty page's row of NULLs left out: its
    first column, a key, is never NULL otherwise), its data version and its total. The rows
    keep the version and the total as their last two columns."""
    version, total = rows[0][-2], rows[0][-1]
    return [row for row in rows if row[0] is not None], str(version), int(total)
