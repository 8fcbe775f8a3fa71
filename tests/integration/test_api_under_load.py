"""The API's fast paths stay correct under concurrency (issue 19; speed is measured in bench/api.py).

* Reads never wait for a writer: with another connection holding a write transaction open on the
  same database, every read route still answers, and a submit made meanwhile waits and lands.
* Concurrent submits from several OS processes into a 2-process server: every accepted job is
  stored once, with its allocation and its one `submitted` event; nothing lost, nothing doubled.
* With the engine on, concurrent submits queue behind the depth quota: exactly the quota runs.
* A read session refuses to write; `/health` answers without the database.

Runs on SQLite and on PostgreSQL (TEST_DATABASE).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update

from orchestrator.core.config import Settings
from orchestrator.db.models import Allocation, Event, Job
from orchestrator.db.session import Database, ReadOnlySessionError
from tests.streams.sse import follow
from tests.support.checks import no_server_errors
from tests.support.hammer import fire
from tests.support.servers import (
    Server,
    create_pg_database,
    drop_pg_database,
    server_factory,
    token,
)
from tests.support.servers import test_database_kind as database_kind
from tests.support.wait import wait_until


@pytest.fixture(autouse=True)
def _no_500s(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from no_server_errors(request)


def _submit(client: httpx.Client, description: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/api/jobs/submit", json={"task_description": description, **extra})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


class HeldWrite:
    """A write transaction held open by another connection (another process's writer, in effect):
    on SQLite the database's write lock (BEGIN IMMEDIATE plus an UPDATE), on PostgreSQL an
    UPDATE of the job's row, uncommitted, until `release`."""

    def __init__(self, database_url: str, job_id: str) -> None:
        self.database_url, self.job_id = database_url, job_id
        self._release = threading.Event()
        self._held = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> HeldWrite:
        self._thread.start()
        assert self._held.wait(60), f"could not take the write lock: {self.error!r}"
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._release.set()
        self._thread.join(60)

    def _run(self) -> None:
        try:
            if self.database_url.startswith("sqlite"):
                conn = sqlite3.connect(self.database_url.split("///", 1)[1], timeout=60, isolation_level=None)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("UPDATE jobs SET priority = priority WHERE id = ?", (self.job_id,))
                    self._held.set()
                    self._release.wait(120)
                    conn.execute("ROLLBACK")
                finally:
                    conn.close()
            else:
                asyncio.run(self._hold_pg())
        except BaseException as error:  # reported by __enter__
            self.error = error
            self._held.set()

    async def _hold_pg(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.database_url)
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("UPDATE jobs SET priority = priority WHERE id = $1", self.job_id)
            self._held.set()
            await asyncio.to_thread(self._release.wait, 120)
            await transaction.rollback()
        finally:
            await conn.close()


def test_reads_answer_while_another_connection_holds_a_write_transaction(tmp_path: Path) -> None:
    """Before issue 19 every request began with BEGIN IMMEDIATE on SQLite, so each read here
    waited for the held lock (60 s busy timeout) and the client's 20 s deadline expired."""
    with server_factory(tmp_path) as servers:
        api = servers.start(ORCHESTRATOR_ENGINE="false")
        headers = {"Authorization": f"Bearer {token()}"}
        with httpx.Client(base_url=api.url, headers=headers, timeout=20.0) as client:
            job = _submit(client, "held")
            with HeldWrite(servers.database_url(), job["id"]) as held:
                assert held.error is None
                assert client.get("/health").json()["status"] == "ok"
                assert client.get("/ready").json()["reason"] == "no engine has ever heartbeated"
                listed = client.get("/api/jobs", params={"limit": 50})
                assert listed.status_code == 200, listed.text
                assert [j["id"] for j in listed.json()["jobs"]] == [job["id"]]
                assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "PENDING"
                assert client.get(f"/api/jobs/{job['id']}/events").status_code == 200
                assert client.get("/api/resources/usage").status_code == 200
                assert client.get("/api/supervisor/workers").status_code == 200
                # The live streams read too: the fleet's used to open a writing unit of work.
                for path in (f"/api/jobs/{job['id']}/events?follow=true", "/api/fleet/events?follow=true"):
                    stream = follow(client, path, last_event_id="e0-l0", max_messages=1, max_seconds=20)
                    assert [m.json()["job_id"] for m in stream.messages] == [job["id"]], path
                # A write meanwhile waits for the lock (it does not fail) and lands once it is free.
                with ThreadPoolExecutor(1) as pool:
                    pending = pool.submit(_submit, client, "written while the lock was held")
                    held.release()
                    written = pending.result(timeout=60)
            assert client.get(f"/api/jobs/{written['id']}").json()["status"] == "PENDING"
            assert client.get("/api/jobs", params={"limit": 1}).json()["total"] == 2


SUBMITTERS = 3
SUBMITS_EACH = 60


def test_concurrent_submits_are_stored_exactly_once(tmp_path: Path) -> None:
    with server_factory(tmp_path) as servers:
        api = servers.start(workers=2, ORCHESTRATOR_ENGINE="false")
        batches = [
            (
                api.url,
                token(),
                [
                    {"path": "/api/jobs/submit", "body": {"task_description": f"load {p}-{i}"}}
                    for i in range(SUBMITS_EACH)
                ],
                8,
            )
            for p in range(SUBMITTERS)
        ]
        with multiprocessing.get_context("spawn").Pool(SUBMITTERS) as pool:
            results = [item for batch in pool.map(fire, batches) for item in batch]
        assert Counter(status for status, _ in results) == {201: SUBMITTERS * SUBMITS_EACH}
        accepted = {body["id"]: body["task_description"] for _, body in results}
        assert len(accepted) == SUBMITTERS * SUBMITS_EACH  # no id handed out twice

        with api.client() as client:
            listed = client.get("/api/jobs", params={"limit": 1000}).json()
        assert listed["total"] == len(accepted)
        assert {j["id"]: j["task_description"] for j in listed["jobs"]} == accepted

        rows = _count_rows(servers.database_url(), list(accepted))
        assert rows == {
            "allocations": len(accepted),
            "submitted_events": len(accepted),
            "jobs": len(accepted),
        }


def _count_rows(database_url: str, job_ids: list[str]) -> dict[str, int]:
    async def count() -> dict[str, int]:
        database = Database(Settings(database_url=database_url))
        try:
            async with database.read_session() as session:
                return {
                    "jobs": (await session.execute(select(func.count()).select_from(Job))).scalar_one(),
                    "allocations": (
                        await session.execute(
                            select(func.count(func.distinct(Allocation.job_id))).where(
                                Allocation.job_id.in_(job_ids), Allocation.depth == 0
                            )
                        )
                    ).scalar_one(),
                    "submitted_events": (
                        await session.execute(
                            select(func.count()).where(
                                Event.job_id.in_(job_ids),
                                Event.kind == "job.status",
                                Event.reason == "submitted",
                            )
                        )
                    ).scalar_one(),
                }
        finally:
            await database.dispose()

    return asyncio.run(count())


QUOTA = 3
QUEUED = 15


def test_concurrent_submits_queue_behind_the_quota(tmp_path: Path) -> None:
    """Engines on (2 processes): every job sleeps, so exactly QUOTA run and the rest wait."""
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.sleep]\ncommand = ["sleep", "600"]\n')
    with server_factory(tmp_path) as servers:
        api = servers.start(
            workers=2,
            ORCHESTRATOR_QUOTAS=f"{QUOTA},2",
            ORCHESTRATOR_AGENTS_FILE=str(agents),
            ORCHESTRATOR_DEFAULT_AGENT="sleep",
        )
        with api.client() as client, ThreadPoolExecutor(8) as pool:
            jobs = list(pool.map(lambda i: _submit(client, f"queued {i}"), range(QUEUED)))
            assert len({j["id"] for j in jobs}) == QUEUED

            def counts() -> dict[str, int]:
                return {
                    s: client.get("/api/jobs", params={"status": s, "limit": 1}).json()["total"]
                    for s in ("RUNNING", "PENDING")
                }

            wait_until(lambda: counts()["RUNNING"] == QUOTA, timeout=120, what=f"{QUOTA} jobs RUNNING")
            usage = next(r for r in client.get("/api/resources/usage").json()["usage"] if r["depth"] == 0)
            assert usage["allocated"] == QUOTA, usage
            assert counts() == {"RUNNING": QUOTA, "PENDING": QUEUED - QUOTA}
            for job in jobs:
                assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
            wait_until(
                lambda: (
                    client.get("/api/jobs", params={"status": "CANCELED", "limit": 1}).json()["total"]
                    == QUEUED
                ),
                timeout=120,
                what="every job canceled",
            )


async def test_a_read_session_refuses_to_write(settings: Settings) -> None:
    database = Database(settings)
    try:
        async with database.session() as session:
            session.add(
                Job(
                    id="j_readonly_probe",
                    status="PENDING",
                    task_description="probe",
                    worker_count=1,
                    depth=0,
                    path="j_readonly_probe/",
                    agent="simulated",
                    created_by="test",
                )
            )
        with pytest.raises(ReadOnlySessionError):
            async with database.read_session() as session:
                await session.execute(update(Job).where(Job.id == "j_readonly_probe").values(priority=5))
        with pytest.raises(ReadOnlySessionError):
            async with database.read_session() as session:
                job = (await session.execute(select(Job).where(Job.id == "j_readonly_probe"))).scalar_one()
                job.priority = 6
                await session.flush()
        async with database.read_session() as session:
            assert (
                await session.execute(text("SELECT priority FROM jobs WHERE id = 'j_readonly_probe'"))
            ).scalar_one() == 0
    finally:
        await database.dispose()


@pytest.mark.skipif(database_kind() != "postgres", reason="drops the server's PostgreSQL database")
def test_health_is_liveness_and_ready_checks_the_database(tmp_path: Path) -> None:
    """With its database gone, the API is still alive (/health 200) but not ready (/ready 503)."""
    url = create_pg_database()
    try:
        with server_factory(tmp_path) as servers:
            servers._database_url = url  # the factory must not drop it: this test does
            api: Server = servers.start(ORCHESTRATOR_ENGINE="false")
            assert httpx.get(f"{api.url}/ready").json()["reason"] == "no engine has ever heartbeated"
            drop_pg_database(url)
            health = httpx.get(f"{api.url}/health", timeout=20)
            assert health.status_code == 200 and health.json()["status"] == "ok"
            ready = httpx.get(f"{api.url}/ready", timeout=20)
            assert ready.status_code == 503
            assert ready.json()["reason"].startswith("database unreachable")
            api.stop()
            servers.servers.clear()  # its log has the expected connection errors
    finally:
        drop_pg_database(url)


@pytest.mark.skipif(database_kind() != "postgres", reason="PostgreSQL's connections closed by the server")
async def test_a_connection_the_server_closed_is_replaced_without_failing_a_request(
    settings: Settings,
) -> None:
    """No ping per checkout (it was three round trips a request): a pooled connection the server
    closed (a restart, an administrator) is noticed as closed and replaced, and the request that
    takes it does not fail."""
    import asyncpg

    database = Database(settings)
    try:
        async with database.read_session() as session:
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            driver = (await (await session.connection()).get_raw_connection()).driver_connection
        admin = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
        try:  # returns once the backend has exited
            assert await admin.fetchval("SELECT pg_terminate_backend($1, 60000)", pid)
        finally:
            await admin.close()
        deadline = asyncio.get_running_loop().time() + 60
        while not driver.is_closed():  # this process reads the server's goodbye
            assert asyncio.get_running_loop().time() < deadline, "the closed connection went unnoticed"
            await asyncio.sleep(0.01)
        async with database.read_session() as session:
            assert (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
    finally:
        await database.dispose()


@pytest.mark.skipif(database_kind() != "postgres", reason="PostgreSQL's round trips")
async def test_a_read_session_on_postgres_adds_no_begin_or_commit(settings: Settings) -> None:
    """Under READ COMMITTED each statement reads its own snapshot anyway: a read session's
    statements run in autocommit, without the two round trips of BEGIN and COMMIT."""
    import asyncpg

    database = Database(settings)
    admin = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        async with database.read_session() as session:
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            # Between two statements: 'idle in transaction' had the session begun one.
            state = await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
        assert state == "idle"
    finally:
        await admin.close()
        await database.dispose()
