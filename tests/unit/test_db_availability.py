"""Which database errors mean "unreachable" (503 in the API, a quiet retry in the engine), and that a
PostgreSQL server that is down surfaces as SQLAlchemy's OperationalError, not a bare OSError."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from orchestrator.core.config import Settings
from orchestrator.db.availability import database_unavailable
from orchestrator.db.session import Database
from tests.support.servers import free_port


class _Orig(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def _dbapi(sqlstate: str | None, *, invalidated: bool = False) -> DBAPIError:
    return DBAPIError("SELECT 1", None, _Orig(sqlstate), connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (OperationalError("SELECT 1", None, _Orig(None)), True),
        (PoolTimeout("QueuePool limit reached"), True),
        (_dbapi(None, invalidated=True), True),  # the server dropped the connection mid-statement
        (_dbapi("57P01"), True),  # terminating connection due to administrator command
        (_dbapi("57P03"), True),  # the database system is starting up
        (_dbapi("08006"), True),  # connection failure
        (_dbapi("53300"), True),  # too many connections
        (_dbapi("40P01"), False),  # a deadlock: a conflict, not an outage
        (IntegrityError("INSERT", None, _Orig("23505")), False),
        (_dbapi("42601"), False),  # a syntax error is a bug, never a 503
        (ValueError("not a database error"), False),
        (FileNotFoundError("not a database error either"), False),
    ],
)
def test_what_counts_as_unavailable(error: BaseException, unavailable: bool) -> None:
    assert database_unavailable(error) is unavailable


def test_a_postgres_server_that_is_down_raises_operational_error() -> None:
    """A real connection attempt to a port nobody listens on."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"

    async def attempt() -> BaseException:
        database = Database(Settings(database_url=url))
        try:
            async with database.session() as session:
                await session.execute(text("SELECT 1"))
        except Exception as exc:
            return exc
        finally:
            await database.dispose()
        raise AssertionError("connected to a port nobody listens on")

    error = asyncio.run(attempt())
    assert isinstance(error, OperationalError), repr(error)
    assert isinstance(error.__cause__, OSError) or isinstance(error.orig.__cause__, OSError)
    assert database_unavailable(error)
