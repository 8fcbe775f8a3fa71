#!/usr/bin/env python
"""Create or upgrade the database schema (idempotent): `python scripts/init_database.py`.

Uses DATABASE_URL (default: a SQLite file in ORCHESTRATOR_DATA_DIR, ./.orchestrator).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.bootstrap import prepare_database
from orchestrator.core.config import get_settings
from orchestrator.db.session import Database


async def init_database() -> str:
    settings = get_settings()
    database = Database(settings)
    try:
        await prepare_database(database, settings)
        return database.engine.url.render_as_string(hide_password=True)
    finally:
        await database.dispose()


def main() -> int:
    try:
        url = asyncio.run(init_database())
    except Exception as exc:  # a clear line for the operator, not a traceback
        print(f"error: could not initialise the database: {exc}", file=sys.stderr)
        return 1
    print(f"Database ready: {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
