"""One integration at a time per repository, across every engine process sharing the database.

PostgreSQL: a session advisory lock held on one connection for the whole integration (it goes
with the connection if the engine dies). SQLite: a row in `repository_locks`; another process
cannot signal its release, so waiters poll, and a row whose engine's heartbeat is stale is taken
over (its engine died)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta

from sqlalchemy import text

from orchestrator.db.models import utcnow
from orchestrator.db.session import Database
from orchestrator.engine.queries import integration as queries

LOCK_POLL_SECONDS = 0.05


def advisory_key(repository: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock, the same in every process."""
    return int.from_bytes(hashlib.sha256(repository.encode()).digest()[:8], "big", signed=True)


@contextlib.asynccontextmanager
async def repository_lock(
    db: Database, repository: str, *, engine_id: str, lease_seconds: float
) -> AsyncIterator[None]:
    if db.is_postgres:
        async with _advisory_lock(db, advisory_key(repository)):
            yield
        return
    while not await _take_row(db, repository, engine_id, lease_seconds):  # noqa: ASYNC110
        await asyncio.sleep(LOCK_POLL_SECONDS)
    try:
        yield
    finally:
        async with db.session() as session:
            await queries.release_repository_row(session, repository, engine_id)


@contextlib.asynccontextmanager
async def _advisory_lock(db: Database, key: int) -> AsyncIterator[None]:
    async with db.engine.connect() as conn:
        while True:
            got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar()
            await conn.commit()
            if got:
                break
            await asyncio.sleep(LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            await conn.commit()


async def _take_row(db: Database, repository: str, engine_id: str, lease_seconds: float) -> bool:
    async with db.session() as session:
        fresh_after = utcnow() - timedelta(seconds=lease_seconds)
        return await queries.take_repository_row(session, repository, engine_id, fresh_after)
