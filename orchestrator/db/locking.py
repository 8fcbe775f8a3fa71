"""Row locks where the database has them.

On PostgreSQL a row read to be changed later in the same transaction is read `FOR UPDATE`. On
SQLite every transaction that may write (`Database.session`) starts with BEGIN IMMEDIATE and so
already excludes every other writer: the same read needs no lock clause (and SQLite has none).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

Query = TypeVar("Query", bound=Select[*tuple[Any, ...]])


def is_postgres(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


def for_update(session: AsyncSession, stmt: Query, **options: Any) -> Query:
    """`stmt` with FOR UPDATE (and `options`, e.g. skip_locked) on PostgreSQL, as is on SQLite."""
    return stmt.with_for_update(**options) if is_postgres(session) else stmt
