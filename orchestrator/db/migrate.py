"""Create or upgrade the schema with Alembic; safe when several processes start at once."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from orchestrator.db.session import Database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 7_417_001


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Serialise concurrent starters (uvicorn --workers 4); released at commit.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    # On SQLite the transaction began with BEGIN IMMEDIATE, which serialises starters already.
    command.upgrade(alembic_config(connection), "head")


async def upgrade_database(database: Database) -> None:
    async with database.engine.begin() as conn:
        await conn.run_sync(_upgrade)
