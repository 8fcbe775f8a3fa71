"""Alembic environment: runs on a connection handed over by orchestrator.db.migrate."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from orchestrator.core.config import get_settings
from orchestrator.db.models import Base
from orchestrator.db.session import Database

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    database = Database(get_settings())
    try:
        async with database.engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await database.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # plain `alembic upgrade head` from the command line
    asyncio.run(_run_with_own_engine())
