"""Direct database access for tests: seed rows the engine would create (workers) or statuses
no API call can reach without the engine (COMPLETED), in the very database a test server uses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.config import Settings
from orchestrator.core.ids import new_worker_id
from orchestrator.db.models import Event, Job, Worker, utcnow
from orchestrator.db.session import Database
from tests.support.servers import Server

T = TypeVar("T")


def settings_for(server: Server) -> Settings:
    return Settings(
        database_url=server.env["DATABASE_URL"],
        orchestrator_data_dir=server.env["ORCHESTRATOR_DATA_DIR"],
        secret_key=server.env["SECRET_KEY"],
    )


def run_in_db(server: Server, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def _run() -> T:
        database = Database(settings_for(server))
        try:
            async with database.session() as session:
                return await work(session)
        finally:
            await database.dispose()

    return asyncio.run(_run())


def seed_worker(server: Server, job_id: str, status: str = "RUNNING", **values: Any) -> str:
    """Insert a worker of `job_id` with `status` (as the engine would) and return its id."""

    async def _seed(session: AsyncSession) -> str:
        job = (await session.execute(select(Job).where(Job.id == job_id))).scalar_one()
        count = (await session.execute(select(func.count()).where(Worker.job_id == job_id))).scalar_one()
        worker_id = new_worker_id()
        now = utcnow()
        session.add(
            Worker(
                id=worker_id,
                job_id=job_id,
                workspace_id=job.workspace_id,
                status=status,
                worker_index=count,
                depth=job.depth,
                agent=job.agent,
                created_at=now,
                updated_at=now,
                **values,
            )
        )
        return worker_id

    return run_in_db(server, _seed)


def set_job_status(server: Server, job_id: str, status: str) -> None:
    async def _set(session: AsyncSession) -> None:
        await session.execute(update(Job).where(Job.id == job_id).values(status=status, updated_at=utcnow()))

    run_in_db(server, _set)


def events_of(server: Server, job_id: str) -> list[tuple[str | None, str | None, str | None]]:
    """(worker_id, from_status, to_status) of every status event of a job, oldest first."""

    async def _read(session: AsyncSession) -> list[tuple[str | None, str | None, str | None]]:
        rows = await session.execute(
            select(Event.worker_id, Event.from_status, Event.to_status)
            .where(Event.job_id == job_id)
            .order_by(Event.id)
        )
        return [(w, f, t) for w, f, t in rows]

    return run_in_db(server, _read)
