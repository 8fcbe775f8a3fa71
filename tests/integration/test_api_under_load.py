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
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update

from orchestrator.agents.registry import AgentRegistry
from orchestrator.core.auth import Actor
from orchestrator.core.config import Settings
from orchestrator.db.models import Allocation, Event, Job
from orchestrator.db.session import Database, ReadOnlySessionError
from orchestrator.jobs import service
from orchestrator.jobs.group_commit import SubmitQueue
from orchestrator.jobs.schemas import JobSubmit
from tests.streams.sse import follow
from tests.support.checks import no_server_errors
from tests.support.hammer import fire
from tests.support.servers import (
    Server,
    ServerFactory,
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


def _in_database(database_url: str, work: Callable[[Database], Awaitable[None]]) -> None:
    async def run() -> None:
        database = Database(Settings(database_url=database_url))
        try:
            await work(database)
        finally:
            await database.dispose()

    asyncio.run(run())


def _count_rows(database_url: str, job_ids: list[str]) -> dict[str, int]:
    async def count() -> dict[str, int]:
        database = Database(Settings(database_url=database_url))
        try:
            async with database.read_session() as session:
                return {
                    "jobs": (await session.execute(select(func.count()).select_from(Job))).scalar_one(),
                    "allocations": (  # one each: exactly as many rows as jobs
                        await session.execute(select(func.count()).where(Allocation.job_id.in_(job_ids)))
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


POISON = "poison"  # a task the database itself refuses (a trigger): an error no check foresees


async def poison_submits(database: Database) -> None:
    """A trigger that makes the database refuse every job whose task is POISON, as a unique index
    refuses a key another process took between the check and the INSERT."""
    async with database.session() as session:
        if database.is_postgres:
            await session.execute(
                text(
                    "CREATE OR REPLACE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.task_description = '{POISON}' THEN RAISE EXCEPTION 'poisoned' "
                    "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            await session.execute(text("DROP TRIGGER IF EXISTS refuse_poison ON jobs"))
            await session.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
                )
            )
        else:
            await session.execute(
                text(
                    "CREATE TRIGGER IF NOT EXISTS refuse_poison BEFORE INSERT ON jobs "
                    f"WHEN NEW.task_description = '{POISON}' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
                )
            )


# One process: its concurrent submits share transactions (jobs/group_commit.py).
KEYS, TRIES_PER_KEY = 6, 4
BUDGET_CHILDREN, BUDGET, CHILD_COST = 10, 1.0, 0.3  # 3 fit in the budget, 7 do not


def _mixed_submits(parent: str, budgeted: str, canceled: str) -> list[tuple[str, dict[str, Any]]]:
    """(what is expected, body) for submits that succeed and fail in every way, interleaved."""
    calls: list[tuple[str, dict[str, Any]]] = []
    calls += [("root", {"task_description": f"root {i}"}) for i in range(40)]
    calls += [
        (
            "key",
            {"task_description": f"key {k}", "depth": 1, "parent_job_id": parent, "delegation_key": f"k{k}"},
        )
        for k in range(KEYS)
        for _ in range(TRIES_PER_KEY)
    ]
    calls += [
        (
            "budget",
            {"task_description": "b", "depth": 1, "parent_job_id": budgeted, "max_cost_usd": CHILD_COST},
        )
        for _ in range(BUDGET_CHILDREN)
    ]
    calls += [
        ("child", {"task_description": f"child {i}", "depth": 1, "parent_job_id": parent}) for i in range(10)
    ]
    calls += [("quota", {"task_description": "too many", "worker_count": 99}) for _ in range(5)]
    calls += [
        ("depth", {"task_description": "wrong depth", "depth": 2, "parent_job_id": parent}) for _ in range(5)
    ]
    calls += [
        ("missing", {"task_description": "orphan", "depth": 1, "parent_job_id": "j_missing"})
        for _ in range(5)
    ]
    calls += [
        ("final", {"task_description": "late", "depth": 1, "parent_job_id": canceled}) for _ in range(5)
    ]
    random.Random(19).shuffle(calls)
    return calls


EXPECTED_STATUS = {
    "root": 201,
    "child": 201,
    "quota": 422,
    "depth": 400,
    "missing": 404,
    "final": 400,
    "poison": 409,  # the database refused it (IntegrityError): it fails alone
}


def test_concurrent_submits_of_one_process_each_get_their_own_answer(servers: ServerFactory) -> None:
    """Submits that pass and fail in every way, racing into one process from several OS
    processes: each gets its own answer (a refused one fails alone), every accepted one is stored
    once with its allocation and event, a delegation key is taken exactly once, and a budget
    admits exactly the children it can cover."""
    api = servers.start(ORCHESTRATOR_ENGINE="false")
    with api.client() as client:
        parent = _submit(client, "parent")["id"]
        budgeted = _submit(client, "budgeted", max_cost_usd=BUDGET)["id"]
        canceled = _submit(client, "canceled")["id"]
        assert client.post(f"/api/jobs/{canceled}/cancel").status_code == 200
    _in_database(servers.database_url(), poison_submits)
    calls = _mixed_submits(parent, budgeted, canceled)
    senders = 3
    batches = [
        (api.url, token(), [{"path": "/api/jobs/submit", "body": body} for _, body in calls[i::senders]], 12)
        for i in range(senders)
    ]
    with multiprocessing.get_context("spawn").Pool(senders) as pool:
        answers = pool.map(fire, batches)
    results = [
        (kind, sent, status, body)
        for i in range(senders)
        for (kind, sent), (status, body) in zip(calls[i::senders], answers[i], strict=True)
    ]
    for kind, _, status, body in results:
        if kind in EXPECTED_STATUS:
            assert status == EXPECTED_STATUS[kind], (kind, status, body)
    for k in range(KEYS):
        tries = sorted(
            s for kind, sent, s, _ in results if kind == "key" and sent["delegation_key"] == f"k{k}"
        )
        assert tries == [201] + [409] * (TRIES_PER_KEY - 1), (k, tries)
    budget_statuses = Counter(status for kind, _, status, _ in results if kind == "budget")
    fitting = int(BUDGET / CHILD_COST)
    assert budget_statuses == {201: fitting, 400: BUDGET_CHILDREN - fitting}, budget_statuses

    accepted = {body["id"]: body for _, _, status, body in results if status == 201}
    assert len(accepted) == sum(1 for _, _, status, _ in results if status == 201)  # no id answered twice
    with api.client() as client:
        listed = client.get("/api/jobs", params={"limit": 1000}).json()
        keyed = client.get("/api/jobs", params={"parent_job_id": parent, "limit": 1000}).json()["jobs"]
    stored = {j["id"]: j for j in listed["jobs"]}
    assert set(stored) == set(accepted) | {parent, budgeted, canceled}  # nothing lost, nothing extra
    assert all(stored[i]["task_description"] == a["task_description"] for i, a in accepted.items())
    keys = [j["delegation_key"] for j in keyed if j["delegation_key"] is not None]
    assert sorted(keys) == [f"k{k}" for k in range(KEYS)]  # each key taken once
    rows = _count_rows(servers.database_url(), list(accepted))
    assert rows == {"allocations": len(accepted), "submitted_events": len(accepted), "jobs": len(stored)}


async def test_one_transaction_carries_concurrent_submits_each_with_its_own_answer(
    settings: Settings,
) -> None:
    """The submits that queue while none is being written go out in one transaction (on
    PostgreSQL one per parent): refused ones refused alone, keys and budgets exact within it.
    A submit the database refuses (the trigger) rolls its transaction back, and the others are
    then written one by one, each answered once. In-process, so the grouping is certain: every
    submit queues before the writing task first runs."""
    database = Database(settings)
    agents = AgentRegistry.from_settings(settings)
    queue = SubmitQueue(database, settings, agents.validate, agents.validate_limits)
    user = Actor(name="user:grouped", user_id="grouped")

    def submit(**body: Any) -> Any:
        return service.submit_grouped(queue, user, JobSubmit(**body))

    try:
        parent, budgeted = await asyncio.gather(
            submit(task_description="p"), submit(task_description="b", max_cost_usd=1.0)
        )
        kinds = ["root"] * 8 + ["key"] * 4 + ["budget"] * 5 + ["missing"] * 2 + ["depth"] * 2
        random.Random(7).shuffle(kinds)
        bodies = {
            "root": {"task_description": "grouped root"},
            "key": {
                "task_description": "keyed",
                "depth": 1,
                "parent_job_id": parent.id,
                "delegation_key": "once",
            },
            "budget": {
                "task_description": "costly",
                "depth": 1,
                "parent_job_id": budgeted.id,
                "max_cost_usd": 0.3,
            },
            "missing": {"task_description": "orphan", "depth": 1, "parent_job_id": "j_nosuchparent"},
            "depth": {"task_description": "deep", "depth": 2, "parent_job_id": parent.id},
        }
        before = queue.transactions
        answers = await asyncio.gather(*(submit(**bodies[kind]) for kind in kinds), return_exceptions=True)
        # SQLite: one transaction. PostgreSQL: one per parent (the roots ride with the first).
        assert queue.transactions - before == (3 if database.is_postgres else 1)
        outcome = Counter((kind, type(answer).__name__) for kind, answer in zip(kinds, answers, strict=True))
        assert outcome == {
            ("root", "Row"): 8,
            ("key", "Row"): 1,
            ("key", "Conflict"): 3,
            ("budget", "Row"): 3,
            ("budget", "BadRequest"): 2,
            ("missing", "NotFound"): 2,
            ("depth", "BadRequest"): 2,
        }, outcome

        await poison_submits(database)
        kinds = ["root"] * 6 + ["poison"] * 2
        random.Random(8).shuffle(kinds)
        before = queue.transactions
        answers = await asyncio.gather(
            *(submit(task_description=POISON if kind == "poison" else "after") for kind in kinds),
            return_exceptions=True,
        )
        outcome = Counter((kind, type(answer).__name__) for kind, answer in zip(kinds, answers, strict=True))
        assert outcome == {("root", "Row"): 6, ("poison", "IntegrityError"): 2}, outcome
        assert queue.transactions - before == 6  # rolled back together, then each written alone

        written = [a.id for a in answers if not isinstance(a, BaseException)]
        async with database.read_session() as session:
            stored = (
                (await session.execute(select(Job.id).where(Job.created_by == "grouped"))).scalars().all()
            )
            events = (
                await session.execute(select(func.count()).where(Event.job_id.in_(stored)))
            ).scalar_one()
            allocations = (
                await session.execute(select(func.count()).where(Allocation.job_id.in_(stored)))
            ).scalar_one()
        assert set(written) <= set(stored) and len(stored) == 2 + 8 + 1 + 3 + 6  # each stored once
        assert events == allocations == len(stored)
    finally:
        await database.dispose()


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


async def test_on_sqlite_submits_that_arrive_while_another_process_writes_join_the_waiting_batch(
    settings: Settings,
) -> None:
    """With several processes (`--workers N`) a process's writer waits for the others' writes:
    the batch is taken once its turn has come, so what arrived meanwhile goes in it (before,
    the first submit's batch was taken before the wait and written alone)."""
    database = Database(settings)
    if database.is_postgres:
        await database.dispose()
        pytest.skip("SQLite's one writer at a time; PostgreSQL pipelines its batches instead")
    other_process = Database(settings)  # its file lock excludes this one's, as another process's
    agents = AgentRegistry.from_settings(settings)
    queue = SubmitQueue(database, settings, agents.validate, agents.validate_limits)
    user = Actor(name="user:turn", user_id="turn")

    def submit(description: str) -> asyncio.Task[Any]:
        return asyncio.create_task(
            service.submit_grouped(queue, user, JobSubmit(task_description=description))
        )

    try:
        before = queue.transactions
        async with other_process.write_turn():
            first = submit("first")
            for _ in range(50):  # the writer runs until it waits (event-loop turns, not time)
                await asyncio.sleep(0)
            later = [submit(f"later {i}") for i in range(9)]
            for _ in range(50):
                await asyncio.sleep(0)
            assert not first.done()  # its writer waits for the other process's write
        answers = await asyncio.gather(first, *later)
        assert len({answer.id for answer in answers}) == 10
        assert queue.transactions - before == 1
    finally:
        await database.dispose()
        await other_process.dispose()
