"""Precompiled statements: the hot-path statements (every engine pass, the API's submit),
compiled by SQLAlchemy once and, on SQLite, run on the driver.

A small statement costs several times more through the ORM session, or even a Core connection
(execution context, parameter and result processing), than for SQLite to run it, and an engine
pass runs a few dozen (figures in docs/BENCHMARKS.md). So on SQLite a statement is compiled once
by SQLAlchemy and then run on the connection's own sqlite3 cursor, in the session's transaction
(`sqlite`). Errors come out as SQLAlchemy's (IntegrityError, OperationalError, ...), as through
the session. On PostgreSQL a round trip costs more than SQLAlchemy's work, and asyncpg's
statement cache and types are SQLAlchemy's to manage: statements run through the session's Core
connection (no ORM layer). Rows (`rows`) have attribute access and unpack like tuples, on both.

Build a `Statement` once, at import (or in a cached builder), and run it with `fetch`, `execute`
or `execute_many`; tests/integration/test_precompiled_statements.py finds every one and runs it
on both databases.
"""

from orchestrator.db.precompiled.rows import Record, record_type
from orchestrator.db.precompiled.run import (
    ReadOnlySessionError,
    Statement,
    StatementSession,
    execute,
    execute_many,
    execute_many_sync,
    fetch,
    fetch_tuples,
)

__all__ = [
    "ReadOnlySessionError",
    "Record",
    "Statement",
    "StatementSession",
    "execute",
    "execute_many",
    "execute_many_sync",
    "fetch",
    "fetch_tuples",
    "record_type",
]
