"""Bring a database up to date for this configuration: schema (Alembic) and per-depth quotas.

Shared by the API's start-up, `orchestrator engine`, `orchestrator db upgrade` and
`scripts/init_database.py`, so every way in prepares the database the same way (and makes the
data dir private first: umask 077, 0700, group/other bits stripped). Idempotent.
"""

from __future__ import annotations

from orchestrator.core.config import Settings
from orchestrator.core.datadir import secure_data_dir
from orchestrator.db.migrate import upgrade_database
from orchestrator.db.session import Database
from orchestrator.resources.repository import sync_pools


async def prepare_database(database: Database, settings: Settings) -> None:
    # First: the umask and the data dir's modes must hold before the database file is made.
    secure_data_dir(settings.data_dir, settings.sqlite_file)
    await upgrade_database(database)
    async with database.session() as session:
        await sync_pools(session, settings.quotas)
