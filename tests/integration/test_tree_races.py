"""A cancel and a child submit racing in one job tree (two real sessions, as two API processes
would have; SQLite, or PostgreSQL with TEST_DATABASE=postgres). Whichever commits first, the child
never stays PENDING under a canceled parent: it is canceled with the tree, or refused.

Each scenario holds one transaction open at its decisive point and starts the other meanwhile.
SQLite serializes writers (BEGIN IMMEDIATE), so there the second simply waits; on PostgreSQL the
two would interleave without the tree lock (jobs.repository.lock_tree)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from orchestrator.api.errors import install_error_handlers
from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest
from orchestrator.db.models import Job
from orchestrator.db.session import Database
from orchestrator.jobs import service
from orchestrator.jobs.schemas import JobSubmit
from tests.integration.conftest import prepared
from tests.support.servers import create_pg_database, drop_pg_database
from tests.unit.test_state_tables import seed_job

OPERATOR = Actor(name="operator", user_id="operator")
# Long enough for the second transaction to finish if nothing makes it wait.
OVERLAP_SECONDS = 0.5


def _accept_agent(name: str | None, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return name or "simulated", options


def _child_of(parent_id: str) -> JobSubmit:
    return JobSubmit(task_description="child", worker_count=1, depth=1, parent_job_id=parent_id)


async def _status(database: Database, job_id: str) -> str:
    async with database.session() as session:
        stmt = select(Job.status).where(Job.id == job_id)
        return str((await session.execute(stmt)).scalar_one())


async def _children(database: Database, parent_id: str) -> list[tuple[str, str]]:
    async with database.session() as session:
        rows = await session.execute(select(Job.id, Job.status).where(Job.parent_job_id == parent_id))
        return [(job_id, status) for job_id, status in rows]


def _run(settings: Settings, scenario: Any) -> None:
    async def both() -> None:
        first, second = Database(settings), Database(settings)
        try:
            await scenario(first, second)
        finally:
            await first.dispose()
            await second.dispose()

    asyncio.run(both())


def test_a_cancel_waits_for_a_child_being_submitted_and_cancels_it(settings: Settings) -> None:
    async def scenario(submitter: Database, canceller: Database) -> None:
        parent_id = await seed_job(submitter, "RUNNING")
        inserted, release = asyncio.Event(), asyncio.Event()

        async def submit() -> str:
            async with submitter.session() as session:
                child = await service.submit(session, settings, OPERATOR, _child_of(parent_id), _accept_agent)
                inserted.set()
                await release.wait()  # the child is written, not yet committed
                return child.id

        async def cancel() -> None:
            async with canceller.session() as session:
                await service.cancel(session, OPERATOR, parent_id)

        submitting = asyncio.create_task(submit())
        await asyncio.wait_for(inserted.wait(), 10)
        cancelling = asyncio.create_task(cancel())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(cancelling), OVERLAP_SECONDS)
        release.set()
        child_id = await submitting
        await asyncio.wait_for(cancelling, 10)
        assert await _status(canceller, parent_id) == "CANCELED"
        assert await _status(canceller, child_id) == "CANCELED"

    _run(settings, scenario)


def test_a_child_submitted_while_its_tree_is_being_canceled_is_refused(settings: Settings) -> None:
    async def scenario(canceller: Database, submitter: Database) -> None:
        parent_id = await seed_job(canceller, "RUNNING")
        canceled, release = asyncio.Event(), asyncio.Event()

        async def cancel() -> None:
            async with canceller.session() as session:
                await service.cancel(session, OPERATOR, parent_id)
                canceled.set()
                await release.wait()  # the tree is canceled, not yet committed

        async def submit() -> None:
            async with submitter.session() as session:
                await service.submit(session, settings, OPERATOR, _child_of(parent_id), _accept_agent)

        cancelling = asyncio.create_task(cancel())
        await asyncio.wait_for(canceled.wait(), 10)
        submitting = asyncio.create_task(submit())
        with contextlib.suppress(TimeoutError, BadRequest):
            await asyncio.wait_for(asyncio.shield(submitting), OVERLAP_SECONDS)
        release.set()
        await asyncio.wait_for(cancelling, 10)
        with pytest.raises(BadRequest, match="CANCELED; it cannot take new child jobs"):
            await asyncio.wait_for(submitting, 10)
        assert await _children(canceller, parent_id) == []

    _run(settings, scenario)


def test_a_deadlock_is_answered_409_not_500(tmp_path: Path) -> None:
    """Two transactions locking two jobs in opposite orders: PostgreSQL aborts one. That request
    gets 409 (safe to repeat: its transaction wrote nothing), not a 500. PostgreSQL whatever
    TEST_DATABASE says: SQLite serializes writers, so it has no deadlocks to answer."""
    url = create_pg_database()

    async def deadlock(settings: Settings) -> DBAPIError:
        first, second = Database(settings), Database(settings)
        try:
            a, b = await seed_job(first, "PENDING"), await seed_job(first, "PENDING")
            both_locked = asyncio.Barrier(2)

            async def lock(database: Database, one: str, other: str) -> None:
                async with database.session() as session:
                    await session.execute(update(Job).where(Job.id == one).values(priority=1))
                    await both_locked.wait()
                    await session.execute(update(Job).where(Job.id == other).values(priority=2))

            outcomes = await asyncio.gather(lock(first, a, b), lock(second, b, a), return_exceptions=True)
            errors = [outcome for outcome in outcomes if isinstance(outcome, DBAPIError)]
            assert len(errors) == 1 and outcomes.count(None) == 1, outcomes
            return errors[0]
        finally:
            await first.dispose()
            await second.dispose()

    try:
        error = asyncio.run(deadlock(prepared(Settings(orchestrator_data_dir=tmp_path, database_url=url))))
    finally:
        drop_pg_database(url)
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/conflicted")
    async def conflicted() -> None:
        raise error

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/conflicted")

    response = asyncio.run(call())
    assert (response.status_code, response.json()) == (
        409,
        {"detail": "Conflicting concurrent change; try again"},
    )
