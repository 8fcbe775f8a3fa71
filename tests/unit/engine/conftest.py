"""The engine's phases, one at a time: a real database (SQLite, or PostgreSQL with
TEST_DATABASE=postgres) prepared as the server prepares it, real worker processes started by the
local executor (unsandboxed: the sandbox has its own tests), and an engine whose phases are wired
but whose loops never run, so each test drives exactly the phase it tests."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.agents.registry import AgentRegistry
from orchestrator.bootstrap import prepare_database
from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.db.models import Job, Worker
from orchestrator.db.session import Database
from orchestrator.engine.engine import Engine
from orchestrator.engine.launcher import Launched
from orchestrator.executors.local import LocalExecutor
from orchestrator.jobs import service as jobs_service
from orchestrator.jobs.schemas import JobSubmit
from tests.support.servers import create_pg_database, drop_pg_database, test_database_kind

T = TypeVar("T")
USER = Actor(name="user:unit", user_id="unit")
PROFILES = """
[agents.true]
command = ["true"]
[agents.sleep]
command = ["sleep", "600"]
[agents.fail]
command = ["sh", "-c", "exit 3"]
[agents.lines]
command = ["sh", "-c", "printf 'one\\ntwo\\nthree\\n'"]
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """engine/integrate.py (settling's gate) still calls `Result.tuples()`, deprecated in
    SQLAlchemy 2.1: tolerated here until that module is updated (it is not the engine's phases')."""
    for item in items:
        if "tests/unit/engine/" in str(item.path):
            item.add_marker(pytest.mark.filterwarnings("ignore:The Result.tuples:DeprecationWarning"))


@dataclass
class Harness:
    settings: Settings
    database: Database
    engine: Engine

    async def submit(self, **body: Any) -> str:
        """A job as the API leaves it: PENDING, unowned, its allocation made."""
        agents = self.engine.agents
        async with self.database.session() as session:
            job = await jobs_service.submit(
                session,
                self.settings,
                USER,
                JobSubmit(task_description="unit", **body),
                agents.validate,
                agents.validate_limits,
            )
            return job.id

    async def job(self, job_id: str) -> Job:
        async with self.database.session() as session:
            found = await session.get(Job, job_id)
            assert found is not None
            return found

    async def workers(self, job_id: str) -> list[Worker]:
        async with self.database.session() as session:
            stmt = select(Worker).where(Worker.job_id == job_id).order_by(Worker.worker_index)
            return list((await session.execute(stmt)).scalars())

    async def in_session(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        async with self.database.session() as session:
            return await work(session)


def settings_for(root: Path, database_url: str, **extra: Any) -> Settings:
    agents = root / "agents.toml"
    agents.write_text(PROFILES)
    values: dict[str, Any] = {
        "orchestrator_data_dir": root / "data",
        "database_url": database_url,
        "orchestrator_agents_file": agents,
        "orchestrator_quotas": "2,1",
        "orchestrator_sandbox": "off",
        "orchestrator_terminate_grace_seconds": 3,
    }
    values.update(extra)
    return Settings(**values)


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    if test_database_kind() == "postgres":
        url = create_pg_database()
        try:
            yield url
        finally:
            drop_pg_database(url)
    else:
        yield f"sqlite:///{tmp_path / 'data' / 'orchestrator.db'}"


async def open_harness(settings: Settings) -> Harness:
    database = Database(settings)
    await prepare_database(database, settings)
    engine = Engine(settings, database, AgentRegistry.from_settings(settings), executor=LocalExecutor())
    engine.sup.loop = asyncio.get_running_loop()
    return Harness(settings, database, engine)


@pytest.fixture
async def harness(tmp_path: Path, database_url: str) -> AsyncIterator[Harness]:
    h = await open_harness(settings_for(tmp_path, database_url))
    try:
        yield h
    finally:
        await close_harness(h)


async def close_harness(h: Harness) -> None:
    for record in list(h.engine.sup.live.values()):
        h.engine.executor.unwatch(record.proc)
        if not record.proc.exited:
            h.engine.executor.send(record.proc, signal.SIGKILL)
    h.engine.launcher.shutdown()
    await h.database.dispose()


async def wait_for(check: Callable[[], Awaitable[bool] | bool], what: str, within: float = 60) -> None:
    """Wait on a state (never on a duration): `check` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def schedule_and_launch(h: Harness) -> list[Launched]:
    """The phases of a pass that start workers, called one by one: the scheduler gives slots,
    the launcher starts the processes (supervised at once), the ledger records the starts."""
    engine = h.engine
    ready = await h.in_session(engine.scheduler.schedule)
    launched = await engine.launcher.launch_all(ready)
    for item in launched:
        if item.spawned is not None:
            engine.sup.supervise(
                item.spawned.proc, item.job, offset=0, lines=0, memory_mb=item.spawned.memory_mb
            )
    await h.in_session(lambda session: engine.ledger.record_starts(session, launched))
    return launched


async def record_exits(h: Harness) -> None:
    """The phases of a pass that end workers: collect the exits, record them, settle the jobs."""
    engine = h.engine
    batch, engine.sup.exited = engine.sup.exited, []
    endings = await engine.ledger.collect_exits(batch)

    async def record(session: AsyncSession) -> None:
        await engine.ledger.record_exits(session, endings, {})
        await engine.ledger.settle_jobs(session)

    await h.in_session(record)
    engine.sup.forget(batch)
