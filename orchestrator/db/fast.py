"""Statements run on the hot path (every engine pass): compiled by SQLAlchemy, run on the driver.

On this 2-core VM a small statement costs ~145 us through the ORM session and ~90 us through a
Core connection (execution context, parameter and result processing), against ~7 us for SQLite
to run it; an engine pass runs ~25 of them. So on SQLite a statement is compiled once by
SQLAlchemy (SQL text, parameter order, literal values, and each parameter's and result column's
type processing) and then run on the connection's own sqlite3 cursor, in the session's
transaction. Errors come out as SQLAlchemy's (IntegrityError, OperationalError, ...), as through
the session. On PostgreSQL a round trip costs more than SQLAlchemy's work, and asyncpg's
statement cache and types are SQLAlchemy's to manage: statements run through the session's Core
connection (no ORM layer).

Rows have attribute access and unpack like tuples, on both databases.
"""

from __future__ import annotations

import keyword
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter

from orchestrator.db.sqlite_inline import InlineConnection

_CONNECTION = "fast_sqlite_connection"
_POSTCOMPILE = re.compile(r"__\[POSTCOMPILE_(\w+)\]")
Params = Mapping[str, Any]
Processor = Callable[[Any], Any] | None


class Record:
    """A row: attribute access and unpacking like SQLAlchemy's Row, and assignable, so the engine
    can keep a row it changed as written (as it would an ORM object) without reading it again."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __init__(self, values: Iterable[Any]) -> None:  # each row type has its own (record_type)
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def __iter__(self) -> Iterator[Any]:
        return (getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Row(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields) + ")"

    def __getattr__(self, name: str) -> Any:  # only for names that are not columns
        raise AttributeError(f"the row has no column {name!r}")


def record_type(columns: Sequence[Any]) -> type[Record]:
    """A Record class for a statement's columns (a repeated name gets a suffix: status, status_1)."""
    fields: list[str] = []
    for i, column in enumerate(columns):
        name = str(getattr(column, "key", None) or f"c{i}")
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            name = f"c{i}"
        while name in fields:
            name = f"{name}_1"
        fields.append(name)
    row_type = type("Row", (Record,), {"__slots__": tuple(fields), "_fields": tuple(fields)})
    if fields:
        # One unpacking assignment instead of a loop over the fields (what namedtuple does too):
        # the engine makes thousands of rows a second. The names are identifiers (checked above).
        namespace: dict[str, Any] = {}
        targets = ", ".join(f"self.{name}" for name in fields)
        exec(f"def __init__(self, values):\n    {targets}, = values", namespace)
        row_type.__init__ = namespace["__init__"]  # type: ignore[misc]
    return row_type


class _Compiled:
    """One statement compiled for SQLite: its SQL split around expanding (IN-list) parameters."""

    __slots__ = ("expanding", "parts", "plan", "result_processors", "sql_by_lengths")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=dialect))
        if compiled.insert_prefetch or compiled.update_prefetch:
            raise ValueError("statements with Python-side column defaults are not supported here")
        # parts: text, name, text, name, ... (names of expanding parameters at odd positions)
        self.parts = _POSTCOMPILE.split(compiled.string)
        # Per placeholder: (key, type processing, IN list?, value when the caller gives none)
        self.plan: list[tuple[str, Processor, bool, Callable[[], Any]]] = []
        for name in compiled.positiontup or []:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self.plan.append((bind.key, processor, bind.expanding, _fallback(bind)))
        self.expanding = any(expanding for _, _, expanding, _ in self.plan)
        columns = list(getattr(statement, "exported_columns", ()) or ())
        self.result_processors: list[Processor] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]
        self.sql_by_lengths: dict[tuple[int, ...], str] = {}

    def sql(self, lengths: tuple[int, ...]) -> str:
        """The SQL with each expanding parameter as that many placeholders."""
        sql = self.sql_by_lengths.get(lengths)
        if sql is None:
            pieces = [self.parts[0]]
            for i, length in enumerate(lengths):
                pieces.append(", ".join("?" * length))
                pieces.append(self.parts[2 * i + 2])
            sql = self.sql_by_lengths[lengths] = "".join(pieces)
        return sql

    def arguments(self, params: Params) -> tuple[list[Any], tuple[int, ...]]:
        if not self.expanding:
            return self.row_arguments(params), ()
        values: list[Any] = []
        lengths: list[int] = []
        for key, processor, expanding, fallback in self.plan:
            value = params[key] if key in params else fallback()
            if expanding:
                items = list(value)
                lengths.append(len(items))
                values.extend(items if processor is None else [processor(item) for item in items])
            else:
                values.append(value if processor is None else processor(value))
        return values, tuple(lengths)

    def row_arguments(self, params: Params) -> list[Any]:
        """`arguments` of a statement without IN lists (one row of an executemany)."""
        values = []
        for key, processor, _, fallback in self.plan:
            value = params[key] if key in params else fallback()
            values.append(value if processor is None else processor(value))
        return values

    def values(self, raw: Sequence[Any]) -> list[Any]:
        return [
            value if p is None else p(value) for value, p in zip(raw, self.result_processors, strict=True)
        ]


class FastStatement:
    """A statement run by `fetch` / `execute` / `execute_many`; build it once, at import.
    `lock`: a SELECT whose rows stay as read until the transaction ends: FOR UPDATE (OF
    `lock_of`) on PostgreSQL; SQLite's BEGIN IMMEDIATE excludes every other writer already
    (db/locking.py)."""

    __slots__ = ("compiled", "core_statement", "row_type", "statement")

    def __init__(self, statement: Executable, *, lock: bool = False, lock_of: Any = None) -> None:
        self.statement = statement
        locked = statement.with_for_update(of=lock_of) if lock else statement  # type: ignore[attr-defined]
        self.core_statement: Any = locked
        self.compiled: _Compiled | None = None
        self.row_type = record_type(list(getattr(statement, "exported_columns", ()) or ()))

    def rows(self, raw_rows: Sequence[Sequence[Any]]) -> list[Any]:
        return [self.row_type(row) for row in raw_rows]

    def for_sqlite(self, dialect: Dialect) -> _Compiled:
        if self.compiled is None:
            self.compiled = _Compiled(self.statement, dialect)
        return self.compiled


class _SQLite:
    """A session's sqlite3 connection, with the SQLAlchemy connection whose transaction it is in
    (its cursor events are dispatched, as SQLAlchemy would: listeners see every statement)."""

    __slots__ = ("connection", "driver")

    def __init__(self, driver: InlineConnection, connection: Connection | None) -> None:
        self.driver, self.connection = driver, connection

    def run(self, sql: str, arguments: Any, *, many: bool) -> sqlite3.Cursor:
        cursor = self.driver.connection.cursor()
        assert self.connection is not None  # the session's connection, its transaction begun
        dispatch = self.connection.dispatch
        if dispatch.before_cursor_execute:
            dispatch.before_cursor_execute(self.connection, cursor, sql, arguments, None, many)
        try:
            if many:
                cursor.executemany(sql, arguments)
            else:
                cursor.execute(sql, arguments)
        except sqlite3.Error as error:
            raise exc.DBAPIError.instance(sql, arguments, error, sqlite3.Error) from error
        if dispatch.after_cursor_execute:
            dispatch.after_cursor_execute(self.connection, cursor, sql, arguments, None, many)
        return cursor

    async def run_async(self, sql: str, arguments: Any, *, many: bool) -> sqlite3.Cursor:
        """In the event loop (in a thread only while another process holds the write lock)."""
        return await self.driver.run_inline(lambda: self.run(sql, arguments, many=many))


async def _sqlite(session: AsyncSession) -> _SQLite | None:
    """The session's sqlite3 connection (its transaction begun), or None on another database."""
    info = session.sync_session.info
    found: _SQLite | None = info.get(_CONNECTION)
    if found is not None:
        return found
    if _dialect(session).name != "sqlite":
        return None
    connection = await session.connection()  # begins the transaction (BEGIN IMMEDIATE)
    raw = await connection.get_raw_connection()
    if not isinstance(raw.driver_connection, InlineConnection):
        return None
    found = info[_CONNECTION] = _SQLite(raw.driver_connection, connection.sync_connection)
    return found


def _dialect(session: AsyncSession) -> Dialect:
    assert session.bind is not None  # Database's sessions are bound to its engine
    return session.bind.dialect


async def _run(
    session: AsyncSession, statement: FastStatement, params: Params
) -> tuple[_Compiled | None, Any]:
    """Run one statement: on SQLite on the driver (its compiled form, the sqlite3 cursor), else
    through SQLAlchemy (None, the result)."""
    sqlite = await _sqlite(session)
    if sqlite is None or _has_empty_list(params):
        return None, await (await session.connection()).execute(statement.core_statement, dict(params))
    compiled = statement.for_sqlite(_dialect(session))
    values, lengths = compiled.arguments(params)
    return compiled, await sqlite.run_async(compiled.sql(lengths), values, many=False)


async def fetch(session: AsyncSession, statement: FastStatement, params: Params | None = None) -> list[Any]:
    """The rows of a SELECT or of a statement with RETURNING."""
    compiled, cursor = await _run(session, statement, params or {})
    if compiled is None:
        return statement.rows(cursor.all())
    return statement.rows([compiled.values(raw) for raw in cursor.fetchall()])


async def execute(session: AsyncSession, statement: FastStatement, params: Params | None = None) -> int:
    """Run a statement that returns no rows; the number of rows it changed."""
    _, cursor = await _run(session, statement, params or {})
    return int(cursor.rowcount)


async def execute_many(session: AsyncSession, statement: FastStatement, rows: Sequence[Params]) -> int:
    """Run a statement once per parameter set (one executemany); the number of rows changed."""
    if not rows:
        return 0
    sqlite = await _sqlite(session)
    if sqlite is None:
        result = await (await session.connection()).execute(statement.core_statement, [dict(r) for r in rows])
        return int(result.rowcount)
    sql, arguments = _many(statement.for_sqlite(_dialect(session)), rows)
    return (await sqlite.run_async(sql, arguments, many=True)).rowcount


def execute_many_sync(connection: Connection, statement: FastStatement, rows: Sequence[Params]) -> None:
    """`execute_many` for synchronous hooks (before_commit), on the transaction's connection."""
    if not rows:
        return
    driver = connection.connection.driver_connection
    if connection.dialect.name != "sqlite" or not isinstance(driver, InlineConnection):
        connection.execute(statement.core_statement, [dict(row) for row in rows])
        return
    sql, arguments = _many(statement.for_sqlite(connection.dialect), rows)
    _SQLite(driver, connection).run(sql, arguments, many=True)


def _many(compiled: _Compiled, rows: Sequence[Params]) -> tuple[str, list[list[Any]]]:
    if compiled.expanding:
        raise ValueError("execute_many takes no IN-list parameters")
    return compiled.sql(()), [compiled.row_arguments(row) for row in rows]


def _fallback(bind: BindParameter[Any]) -> Callable[[], Any]:
    """The value of a parameter the caller does not give: the statement's literal, or an error."""
    if bind.callable is not None:
        return bind.callable
    if bind.required:

        def missing() -> Any:
            raise exc.ArgumentError(f"missing value for parameter {bind.key!r}")

        return missing
    value = bind.value
    return lambda: value


def _has_empty_list(params: Params) -> bool:
    """An empty IN list: SQLAlchemy renders it as an always-false (or, negated, always-true)
    expression; such statements take the ordinary path."""
    return any(isinstance(value, list | tuple) and not value for value in params.values())


@event.listens_for(Session, "after_transaction_end")
def _forget_connection(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_CONNECTION, None)
