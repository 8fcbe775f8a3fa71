"""SQLite writers of different processes queue on a file lock (orchestrator/db/write_lock.py)
instead of sleeping in SQLite's busy handler: a holder excludes other Database objects' writers
(each its own open file, as another process's would be), not their readers, and a waiter that is
cancelled never leaves the lock taken.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import text

from orchestrator.core.config import Settings
from orchestrator.db.migrate import upgrade_database
from orchestrator.db.session import Database
from orchestrator.db.write_lock import FileWriteLock

DEADLINE = 60.0


async def test_a_cancelled_waiter_leaves_the_lock_free(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    holder, cancelled, later = FileWriteLock(path), FileWriteLock(path), FileWriteLock(path)
    try:

        async def take(lock: FileWriteLock) -> None:
            async with lock.held():
                pass

        async with holder.held():
            waiting = asyncio.create_task(take(cancelled))
            await asyncio.sleep(0.05)  # its thread blocks on the lock (if not yet, it blocks later)
            waiting.cancel()
        # The cancelled waiter's thread gets the lock once the holder lets go, and must give it back.
        await asyncio.wait_for(take(later), DEADLINE)
        assert waiting.cancelled()
    finally:
        for lock in (holder, cancelled, later):
            lock.close()


async def test_a_writer_waits_for_another_process_holding_the_lock_and_readers_do_not(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'o.db'}", orchestrator_data_dir=str(tmp_path))
    database = Database(settings)
    await upgrade_database(database)
    other_process = FileWriteLock(str(tmp_path / "o.db"))
    try:

        async def write() -> None:
            async with database.session() as session:
                await session.execute(text("UPDATE resource_pools SET allocated = allocated"))

        async with other_process.held():
            writing = asyncio.create_task(write())
            async with database.read_session() as session:  # a reader goes ahead
                assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
            await asyncio.sleep(0.05)
            assert not writing.done(), "a writer began while another process held the write lock"
        await asyncio.wait_for(writing, DEADLINE)
    finally:
        other_process.close()
        await database.dispose()
