"""The inline SQLite driver: statements run in the event loop, yet a write lock held by another
process never stalls the loop, and errors surface as SQLAlchemy errors."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from orchestrator.core.config import Settings
from orchestrator.db.migrate import upgrade_database
from orchestrator.db.models import ResourcePool
from orchestrator.db.session import Database
from orchestrator.resources.repository import sync_pools


def _settings(tmp_path: Path) -> Settings:
    return Settings(orchestrator_data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'inline.db'}")


def test_a_write_lock_held_elsewhere_waits_off_the_event_loop(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    hold_seconds = 0.6

    async def scenario() -> None:
        database = Database(settings)
        try:
            await upgrade_database(database)
            async with database.session() as session:
                await sync_pools(session, [10, 8, 5, 3, 2, 1])
            # Another connection (as another process would) takes the write lock and holds it.
            other = sqlite3.connect(tmp_path / "inline.db", isolation_level=None, check_same_thread=False)
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE resource_pools SET allocated = 1 WHERE depth = 0")
            threading.Timer(hold_seconds, lambda: other.execute("COMMIT")).start()

            ticks = 0
            done = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not done.is_set():
                    await asyncio.sleep(0.01)
                    ticks += 1

            async def writer() -> float:
                started = time.monotonic()
                async with database.session() as session:
                    await session.execute(
                        text("UPDATE resource_pools SET allocated = allocated + 1 WHERE depth = 0")
                    )
                done.set()
                return time.monotonic() - started

            ticking = asyncio.create_task(ticker())
            waited = await writer()
            await ticking
            other.close()
            assert waited >= hold_seconds - 0.1, "the writer did not wait for the lock"
            # The loop kept running while the writer waited: ~60 ticks of 10 ms, not 0.
            assert ticks >= 20, f"event loop stalled while waiting for the lock ({ticks} ticks)"
            async with database.session() as session:
                stmt = select(ResourcePool.allocated).where(ResourcePool.depth == 0)
                assert (await session.execute(stmt)).scalar_one() == 2  # both writes, in order
        finally:
            await database.dispose()

    asyncio.run(scenario())


def test_errors_are_raised_as_sqlalchemy_errors_and_roll_back(tmp_path: Path) -> None:
    settings = _settings(tmp_path)

    async def scenario() -> None:
        database = Database(settings)
        try:
            await upgrade_database(database)
            with pytest.raises(OperationalError, match="no such table"):
                async with database.session() as session:
                    await session.execute(text("CREATE TABLE scratch (x INTEGER)"))
                    await session.execute(text("SELECT * FROM missing_table"))
            async with database.session() as session:
                found = await session.execute(text("SELECT name FROM sqlite_master WHERE name = 'scratch'"))
                assert found.first() is None  # the failed transaction left nothing behind
        finally:
            await database.dispose()

    asyncio.run(scenario())
