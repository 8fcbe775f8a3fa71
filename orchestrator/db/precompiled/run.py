"""Running a precompiled statement in a session's transaction, and the session that keeps the
transaction's sqlite3 connection for it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import Executable

from orchestrator.db.precompiled.rows import record_type
from orchestrator.db.precompiled.sqlite import CompiledForSQLite, Params, SQLiteDriver, many_arguments
from orchestrator.db.sqlite_inline import InlineConnection


class ReadOnlySessionError(RuntimeError):
    """A read session was asked to write: a bug in the caller, which must use `Database.session`."""


class Statement:
    """A statement run by `fetch` / `execute` / `execute_many`; build it once, at import.
    `lock`: a SELECT whose rows stay as read until the transaction ends: FOR UPDATE (OF
    `lock_of`) on PostgreSQL; SQLite's BEGIN IMMEDIATE excludes every other writer already
    (db/locking.py)."""

    __slots__ = ("compiled", "core_statement", "row_type", "statement", "writes")

    def __init__(self, statement: Executable, *, lock: bool = False, lock_of: Any = None) -> None:
        self.statement = statement
        locked = statement.with_for_update(of=lock_of) if lock else statement  # type: ignore[attr-defined]
        self.core_statement: Any = locked
        self.compiled: CompiledForSQLite | None = None
        self.row_type = record_type(list(getattr(statement, "exported_columns", ()) or ()))
        # An INSERT, UPDATE or DELETE (a read session refuses to run it).
        self.writes = bool(getattr(statement, "is_dml", False))

    def rows(self, raw_rows: Sequence[Sequence[Any]]) -> list[Any]:
        return [self.row_type(row) for row in raw_rows]

    def for_sqlite(self, dialect: Dialect) -> CompiledForSQLite:
        if self.compiled is None:
            self.compiled = CompiledForSQLite(self.statement, dialect)
        return self.compiled


class StatementSession(AsyncSession):
    """A session that keeps its transaction's sqlite3 connection while the transaction lasts, so
    each statement does not look it up again; `read_only` sessions refuse statements that write."""

    read_only: ClassVar[bool] = False
    sqlite_driver: SQLiteDriver | None = None

    async def commit(self) -> None:
        self.sqlite_driver = None
        await super().commit()

    async def rollback(self) -> None:
        self.sqlite_driver = None
        await super().rollback()

    async def close(self) -> None:
        self.sqlite_driver = None
        await super().close()


async def _sqlite(session: AsyncSession) -> SQLiteDriver | None:
    """The session's sqlite3 connection (its transaction begun), or None on another database."""
    kept = session if isinstance(session, StatementSession) else None
    if kept is not None and kept.sqlite_driver is not None:
        return kept.sqlite_driver
    if _dialect(session).name != "sqlite":
        return None
    connection = await session.connection()  # begins the transaction (BEGIN IMMEDIATE)
    raw = await connection.get_raw_connection()
    if not isinstance(raw.driver_connection, InlineConnection):
        return None
    found = SQLiteDriver(raw.driver_connection, connection.sync_connection)
    if kept is not None:
        kept.sqlite_driver = found
    return found


def _dialect(session: AsyncSession) -> Dialect:
    assert session.bind is not None  # Database's sessions are bound to its engine
    return session.bind.dialect


async def _run(
    session: AsyncSession, statement: Statement, params: Params
) -> tuple[CompiledForSQLite | None, Any]:
    """Run one statement: on SQLite on the driver (its compiled form, the sqlite3 cursor), else
    through SQLAlchemy (None, the result)."""
    _may_run(session, statement)
    sqlite = await _sqlite(session)
    if sqlite is None or _has_empty_list(params):
        return None, await (await session.connection()).execute(statement.core_statement, dict(params))
    compiled = statement.for_sqlite(_dialect(session))
    values, lengths = compiled.arguments(params)
    return compiled, await sqlite.run_async(compiled.sql(lengths), values, many=False)


async def fetch(session: AsyncSession, statement: Statement, params: Params | None = None) -> list[Any]:
    """The rows of a SELECT or of a statement with RETURNING."""
    compiled, cursor = await _run(session, statement, params or {})
    if compiled is None:
        return statement.rows(cursor.all())
    return statement.rows([compiled.values(raw) for raw in cursor.fetchall()])


async def fetch_tuples(
    session: AsyncSession, statement: Statement, params: Params | None = None
) -> Sequence[Sequence[Any]]:
    """`fetch`'s rows as plain sequences in column order, without a row object each: a caller
    that only passes the values on (a page serialised to JSON) saves building 50 of them."""
    compiled, cursor = await _run(session, statement, params or {})
    if compiled is None:
        return cursor.all()  # type: ignore[no-any-return]
    if not any(compiled.result_processors):
        return cursor.fetchall()  # type: ignore[no-any-return]
    return [compiled.values(raw) for raw in cursor.fetchall()]


async def execute(session: AsyncSession, statement: Statement, params: Params | None = None) -> int:
    """Run a statement that returns no rows; the number of rows it changed."""
    _, cursor = await _run(session, statement, params or {})
    return int(cursor.rowcount)


async def execute_many(session: AsyncSession, statement: Statement, rows: Sequence[Params]) -> int:
    """Run a statement once per parameter set (one executemany); the number of rows changed."""
    _may_run(session, statement)
    if not rows:
        return 0
    sqlite = await _sqlite(session)
    if sqlite is None:
        result = await (await session.connection()).execute(statement.core_statement, [dict(r) for r in rows])
        return int(result.rowcount)
    sql, arguments = many_arguments(statement.for_sqlite(_dialect(session)), rows)
    return (await sqlite.run_async(sql, arguments, many=True)).rowcount


def execute_many_sync(connection: Connection, statement: Statement, rows: Sequence[Params]) -> None:
    """`execute_many` in synchronous code (a unit of work's commit), on the transaction's connection."""
    if not rows:
        return
    driver = connection.connection.driver_connection
    if connection.dialect.name != "sqlite" or not isinstance(driver, InlineConnection):
        connection.execute(statement.core_statement, [dict(row) for row in rows])
        return
    sql, arguments = many_arguments(statement.for_sqlite(connection.dialect), rows)
    SQLiteDriver(driver, connection).run(sql, arguments, many=True)


def _may_run(session: AsyncSession, statement: Statement) -> None:
    if statement.writes and isinstance(session, StatementSession) and session.read_only:
        raise ReadOnlySessionError("a read session cannot run a statement that writes")


def _has_empty_list(params: Params) -> bool:
    """An empty IN list: SQLAlchemy renders it as an always-false (or, negated, always-true)
    expression; such statements take the ordinary path."""
    return any(isinstance(value, list | tuple) and not value for value in params.values())
