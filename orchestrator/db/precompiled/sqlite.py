"""A statement compiled once for SQLite, and the sqlite3 connection of a session's transaction it
runs on (SQLAlchemy compiles: SQL text, parameter order, literals, each parameter's and result
column's type processing; the driver runs it)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter

from orchestrator.db.sqlite_inline import InlineConnection

_POSTCOMPILE = re.compile(r"__\[POSTCOMPILE_(\w+)\]")
Params = Mapping[str, Any]
Processor = Callable[[Any], Any] | None


class CompiledForSQLite:
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


class SQLiteDriver:
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


def many_arguments(compiled: CompiledForSQLite, rows: Sequence[Params]) -> tuple[str, list[list[Any]]]:
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
