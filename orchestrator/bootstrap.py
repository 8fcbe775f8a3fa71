"""Bring a database up to date for this configuration: schema (Alembic) and per-depth quotas.

Shared by the API's start-up, `orchestrator engine`, `orchestrator db upgrade` and
`scripts/init_database.py`, so every way in prepares the database the same way. Idempotent.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from orchestrator.core.config import Settings
from orchestrator.db.migrate import upgrade_database
from orchestrator.db.session import Database
from orchestrator.resources.repository import sync_pools


async def prepare_database(database: Database, settings: Settings) -> None:
    secure_data_dir(settings.data_dir)
    await upgrade_database(database)
    secure_data_dir(settings.data_dir)  # the SQLite file, if this made it (its journals follow its mode)
    async with database.session() as session:
        await sync_pools(session, settings.quotas)


OWN_FILES = ("orchestrator.db", "secret_key", ".secret_key", "seccomp.bpf")


def secure_data_dir(data_dir: Path) -> None:
    """The data dir is the server's alone: 0700, and the files directly in it (database, its
    journals, the secret key) 0600. Only the files the server makes there are touched, in case
    the data dir is set to a directory that holds other things. Worker run dirs and logs inside
    are made private by the worker wrapper (umask 077)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(data_dir, 0o700)
    for entry in os.scandir(data_dir):
        if entry.is_file(follow_symlinks=False) and entry.name.startswith(OWN_FILES):
            with contextlib.suppress(OSError):
                os.chmod(entry.path, 0o600)
