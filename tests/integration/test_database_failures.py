"""PostgreSQL failures beyond a clean restart (that one: test_database_restart.py), for real: every
backend terminated again and again, the postmaster killed with kill -9, an immediate stop, the
database renamed and back, dropped, every connection slot taken, statement and lock timeouts.

For each, while it lasts the API answers 503 `{"detail": ...}` with Retry-After that says which
(never a 500); the engines keep their workers; afterwards no worker was started twice, no log line
is lost or stored twice (the stored lines are the worker's output file, line for line), every
acknowledged submit runs, and each process logged a line per outage, no traceback.

The module runs a private PostgreSQL server (tests/support/pgcluster.py; the shared one must not be
disturbed), and each test a database of its own on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.test_database_restart import engines_of, worker_starts
from tests.integration.test_engine_lifecycle import log_lines, pid_alive, submit, wait_final, workers_of
from tests.support.pgcluster import PgCluster
from tests.support.servers import Server, ServerFactory, server_factory
from tests.support.servers import test_database_kind as database_kind
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(database_kind() != "postgres", reason="PostgreSQL server failures")

# A work clock (it counts only while the worker runs): long enough to be running when the failure
# starts, whatever the load; the outages may outlast it (an exit recorded late is part of the test).
LONG_RUN = {"duration_seconds": 20.0}
SHORT_RUN = {"duration_seconds": 0.5}
OUTAGE_LINE = re.compile(r"database (unavailable|busy):")


def run_sql(url: str, *statements: str) -> list[Any]:
    """Run `statements` on a connection of its own; the rows of the last."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            rows: list[Any] = []
            for statement in statements:
                rows = await conn.fetch(statement)
            return rows
        finally:
            await conn.close()

    return asyncio.run(run())


def terminate_backends(cluster: PgCluster, database: str) -> int:
    rows = run_sql(
        cluster.url_of("postgres"),
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
    )
    return int(rows[0]["n"])


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    pg = PgCluster().init()
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


@dataclass
class OnDatabase:
    factory: ServerFactory
    cluster: PgCluster
    name: str


@pytest.fixture
def on_db(tmp_path: Path, cluster: PgCluster) -> Iterator[OnDatabase]:
    name = f"orch_fail_{uuid.uuid4().hex[:10]}"
    run_sql(cluster.url_of("postgres"), f'CREATE DATABASE "{name}"')
    try:
        with server_factory(tmp_path) as factory:
            factory._database_url = cluster.url_of(name)
            yield OnDatabase(factory, cluster, name)
    finally:
        if not cluster.running():
            cluster.start_after_crash()
        for old in (name, f"{name}_away"):
            run_sql(cluster.url_of("postgres"), f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)')


@dataclass
class Fleet:
    """An API process, engines of their own, two jobs of two long workers running, and short jobs
    acknowledged just before the failure."""

    factory: ServerFactory
    api: Server
    engines: list[Any]
    running: list[dict[str, Any]]
    before: dict[str, dict[str, Any]]
    queued: list[dict[str, Any]] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return self.api.client()

    def probe(self, client: httpx.Client) -> int:
        """A read and a submit: any answer but a 500 (an acknowledged submit must run)."""
        code = client.get("/api/jobs").status_code
        created = client.post(
            "/api/jobs/submit", json={"task_description": "probe", "agent_options": SHORT_RUN}
        )
        if created.status_code == 201:
            self.queued.append(created.json())
        else:
            unavailable(created)
        self.codes += [code, created.status_code]
        assert not {code, created.status_code} - {200, 201, 503}, self.codes
        return code

    def logs(self) -> dict[str, str]:
        paths = [self.api.log_path, *Path(self.factory.root).glob("engine-*.log")]
        return {path.name: path.read_text(errors="replace") for path in paths}


@contextlib.contextmanager
def fleet(factory: ServerFactory, engines: int = 2) -> Iterator[Fleet]:
    api = factory.start(ORCHESTRATOR_ENGINE="false")
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(factory.standalone_engine(api)) for _ in range(engines)]
        with api.client() as client:
            running = [submit(client, worker_count=2, agent_options=LONG_RUN) for _ in range(2)]

            def all_running() -> bool:
                workers = [w for job in running for w in workers_of(client, job["id"])]
                return len(workers) == 4 and all(w["status"] == "RUNNING" and w["pid"] for w in workers)

            wait_until(all_running, timeout=120, what="four workers running")
            before = {w["id"]: w for job in running for w in workers_of(client, job["id"])}
            queued = [submit(client, worker_count=1, agent_options=SHORT_RUN) for _ in range(2)]
        yield Fleet(factory, api, procs, running, before, queued)


def unavailable(response: httpx.Response, says: str = "database unavailable") -> None:
    assert response.status_code == 503, response.text
    assert response.json()["detail"].startswith(says), response.text
    assert int(response.headers["Retry-After"]) > 0, response.headers


def first_503(client: httpx.Client, fleet: Fleet) -> httpx.Response:
    """Probe until the API notices the failure (a pooled connection may serve one more request)."""
    wait_until(lambda: fleet.probe(client) == 503, timeout=120, what="the API to answer 503")
    response = client.get("/api/jobs")
    assert response.status_code == 503, response.text
    return response


def engines_and_workers_alive(fleet: Fleet) -> None:
    runs = Path(fleet.factory.root) / "data" / "runs"
    for engine in fleet.engines:
        assert engine.poll() is None, "an engine died with the database"
    for worker in fleet.before.values():
        # Running still, or its work done (the outage may outlast it): none was killed.
        exit_file = runs / worker["id"] / "exit"
        assert pid_alive(worker["pid"]) or exit_file.read_text().strip() == "0", worker


def nothing_lost(fleet: Fleet, outages: int) -> None:
    """Everything acknowledged ran once, to the end, with its whole output; one line per outage."""
    root = Path(fleet.factory.root) / "data" / "runs"
    with fleet.client() as client:
        wait_until(lambda: client.get("/api/jobs").status_code == 200, timeout=180, what="the API back")
        for job in fleet.running + fleet.queued:
            done = wait_final(client, job["id"], timeout=300)
            assert done["status"] == "COMPLETED", done
            assert sorted(worker_starts(client, job["id"]).values()) == [1] * job["worker_count"], job["id"]
            assert len(engines_of(client, job["id"])) == 1, "an engine took over a live peer's job"
            for worker in workers_of(client, job["id"]):
                assert worker["status"] == "COMPLETED" and worker["exit_code"] == 0, worker
                if worker["id"] in fleet.before:
                    assert worker["pid"] == fleet.before[worker["id"]]["pid"], "the worker was started again"
                output = (root / worker["id"] / "output.log").read_text(errors="replace").splitlines()
                assert log_lines(client, worker["id"]) == output, "log lines lost or stored twice"
        usage = client.get("/api/resources/usage").json()["usage"]
        assert [row["allocated"] for row in usage] == [0] * len(usage)
    for engine in fleet.engines:
        assert engine.poll() is None, "an engine died after the database came back"
    quiet_logs(fleet.logs(), outages)


def quiet_logs(logs: dict[str, str], outages: int) -> None:
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}:\n{text[-6000:]}"
        assert "taking over" not in text, f"{name}: an engine declared a live peer dead"
        lines = [line for line in text.splitlines() if OUTAGE_LINE.search(line)]
        # One line per outage and per kind of failure met in it (down, refusing, missing), not
        # one per attempt or per request.
        assert len(lines) <= 3 * outages, f"{name}: {len(lines)} outage lines:\n" + "\n".join(lines[:40])


def test_backends_terminated_again_and_again(on_db: OnDatabase) -> None:
    rounds = 6
    with fleet(on_db.factory) as run, run.client() as client:
        for _ in range(rounds):
            terminate_backends(on_db.cluster, on_db.name)
            run.probe(client)
            wait_until(lambda: run.probe(client) == 200, timeout=120, what="the API to answer again")
        engines_and_workers_alive(run)
        nothing_lost(run, outages=rounds)


class Stream(threading.Thread):
    """A client following the fleet's live events: the names of the events it got, to the end."""

    def __init__(self, api: Server) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.events: list[str] = []
        self.open = threading.Event()

    def run(self) -> None:
        with (
            self.api.client() as client,
            client.stream("GET", "/api/fleet/events", params={"follow": "true"}) as response,
        ):
            assert response.status_code == 200
            self.open.set()
            for line in response.iter_lines():
                if line.startswith("event:"):
                    self.events.append(line.split(":", 1)[1].strip())


@pytest.mark.parametrize("how", ["kill -9", "immediate stop"])
def test_server_crash_and_restart(on_db: OnDatabase, how: str) -> None:
    with fleet(on_db.factory) as run, run.client() as client:
        stream = Stream(run.api)
        stream.start()
        assert stream.open.wait(120), "the stream did not open"
        if how == "kill -9":
            on_db.cluster.kill9()
        else:
            on_db.cluster.stop("immediate")
        unavailable(first_503(client, run))
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["reason"].startswith("database unreachable"), (
            ready.text
        )
        # An open stream ends with a frame that says why (the client resumes from its last id).
        stream.join(120)
        assert not stream.is_alive() and stream.events[-1:] == ["unavailable"], stream.events
        engines_and_workers_alive(run)
        on_db.cluster.start_after_crash()  # crash recovery
        nothing_lost(run, outages=1)


def wait_for_engines_to_say(run: Fleet, words: str) -> None:
    def said() -> bool:
        logs = [text for name, text in run.logs().items() if name.startswith("engine-")]
        return all(words in text for text in logs)

    wait_until(said, timeout=120, what=f"every engine to log {words!r}")


def test_sessions_the_server_ends_while_it_stays_up_are_no_outage_of_the_listen(on_db: OnDatabase) -> None:
    """Every session ended by the server (an administrator's pg_terminate_backend) while the
    database stays up. The engine's LISTEN connection is found closed up to a keep-alive later,
    maybe after the other loops reconnected: it is made again, and no line says the database
    is unavailable because of it (it was serving all along)."""
    with fleet(on_db.factory, engines=1) as run, run.client() as client:
        assert terminate_backends(on_db.cluster, on_db.name) > 0
        wait_for_engines_to_say(run, "closed the LISTEN connection")  # found, up to a keep-alive later
        run.queued.append(submit(client, worker_count=1, agent_options=SHORT_RUN))
        nothing_lost(run, outages=1)
    for name, text in run.logs().items():
        listen = [line for line in text.splitlines() if OUTAGE_LINE.search(line) and "LISTEN" in line]
        assert not listen, f"{name}: {listen}"


def test_database_renamed_and_back(on_db: OnDatabase) -> None:
    admin, name = on_db.cluster.url_of("postgres"), on_db.name
    with fleet(on_db.factory) as run, run.client() as client:
        # A database in use cannot be renamed: stop new sessions, end the open ones, rename.
        run_sql(admin, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        terminate_backends(on_db.cluster, name)
        run_sql(admin, f'ALTER DATABASE "{name}" RENAME TO "{name}_away"')
        unavailable(first_503(client, run))
        missing = client.post("/api/jobs/submit", json={"task_description": "while it is away"})
        unavailable(missing)
        assert "does not exist" in missing.json()["detail"], missing.text
        wait_for_engines_to_say(run, "does not exist")
        engines_and_workers_alive(run)
        run_sql(admin, f'ALTER DATABASE "{name}_away" WITH ALLOW_CONNECTIONS true')
        run_sql(admin, f'ALTER DATABASE "{name}_away" RENAME TO "{name}"')
        nothing_lost(run, outages=1)


def test_database_dropped_then_created_empty(on_db: OnDatabase) -> None:
    admin, name = on_db.cluster.url_of("postgres"), on_db.name
    with fleet(on_db.factory, engines=1) as run, run.client() as client:
        run_sql(admin, f'DROP DATABASE "{name}" WITH (FORCE)')
        response = first_503(client, run)
        unavailable(response)
        assert "does not exist" in response.json()["detail"], response.text
        wait_for_engines_to_say(run, "does not exist")
        engines_and_workers_alive(run)
        # Back, but empty: still a 503 that says what is wrong, not a 500 per request.
        run_sql(admin, f'CREATE DATABASE "{name}"')

        def says_empty() -> bool:
            answer = client.get("/api/jobs")
            assert answer.status_code == 503, answer.text
            return "tables are missing" in answer.json()["detail"]

        wait_until(says_empty, timeout=120, what="a 503 that says the tables are missing")
        wait_for_engines_to_say(run, "tables are missing")
        for engine in run.engines:
            assert engine.poll() is None, "the engine died"
        quiet_logs(run.logs(), outages=2)


def test_every_connection_slot_taken(tmp_path: Path) -> None:
    """max_connections reached (each slot held by another client): 503, and back when they go."""
    small = PgCluster(max_connections=25).init()
    small.start()
    loop = asyncio.new_event_loop()
    held: list[asyncpg.Connection] = []
    try:
        with server_factory(tmp_path) as factory:
            factory._database_url = small.url
            with fleet(factory, engines=1) as run, run.client() as client:
                loop.run_until_complete(_take_every_slot(small, held))
                response = first_503(client, run)
                unavailable(response)
                assert "no more connections" in response.json()["detail"], response.text
                engines_and_workers_alive(run)
                loop.run_until_complete(_release(held))
                nothing_lost(run, outages=1)
    finally:
        loop.run_until_complete(_release(held))
        loop.close()
        small.destroy()


async def _take_every_slot(cluster: PgCluster, held: list[asyncpg.Connection]) -> None:
    """Fill every slot, then end the orchestrator's sessions and take their slots too, until
    every client session on the server is ours."""

    async def fill() -> None:
        while True:
            try:
                held.append(await asyncpg.connect(cluster.url))
            except asyncpg.TooManyConnectionsError:
                return

    for _ in range(1000):
        await fill()
        ours = [conn.get_server_pid() for conn in held]
        others = await held[0].fetch(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND NOT (pid = ANY($1::int[]))",
            ours,
        )
        if not others:
            return
        for row in others:
            await held[0].execute("SELECT pg_terminate_backend($1)", row["pid"])
    raise AssertionError("the orchestrator's sessions kept coming back")


async def _release(held: list[asyncpg.Connection]) -> None:
    while held:
        await held.pop().close()


def test_statement_and_lock_timeouts(on_db: OnDatabase) -> None:
    """A table held locked by someone else: the request ends with a 503 that names the timeout."""
    admin, name = on_db.cluster.url_of("postgres"), on_db.name
    url = on_db.cluster.url_of(name)
    run_sql(admin, f"ALTER DATABASE \"{name}\" SET statement_timeout = '3s'")
    api = on_db.factory.start(ORCHESTRATOR_ENGINE="false")
    loop = asyncio.new_event_loop()
    locker: asyncpg.Connection = loop.run_until_complete(asyncpg.connect(url))
    try:
        with api.client() as client:
            assert client.get("/api/jobs").status_code == 200
            for setting, says in (
                ("statement_timeout", "database busy: a statement ran past"),
                ("lock_timeout", "database busy: a lock was not granted"),
            ):
                if setting == "lock_timeout":  # for the sessions to come: end the open ones
                    run_sql(admin, f"ALTER DATABASE \"{name}\" SET lock_timeout = '1s'")
                    terminate_backends(on_db.cluster, name)
                    locker.terminate()
                    locker = loop.run_until_complete(asyncpg.connect(url))
                loop.run_until_complete(locker.execute("BEGIN; LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
                # A list not read before: one read since is answered from memory while nothing
                # committed (jobs/pages.py), the lock held or not.
                unavailable(client.get("/api/jobs", params={"q": setting}), says)
                unavailable(client.post("/api/jobs/submit", json={"task_description": "locked out"}), says)
                loop.run_until_complete(locker.execute("ROLLBACK"))
            listed = client.get("/api/jobs")
            assert listed.status_code == 200, listed.text
            assert listed.json()["total"] == 0, "a submit answered 503 was saved"
        quiet_logs({"api": api.log()}, outages=4)
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(locker.close())
        loop.close()


def test_a_frozen_server_is_a_503_not_a_hang(on_db: OnDatabase) -> None:
    """The postmaster frozen (SIGSTOP): open sessions still answer, a new connection gets no answer
    at all. A request that needs one is a 503 after the connect timeout, not a hung client (the
    client's own timeout, 30 s, bounds it: asyncpg's default would wait 60 s)."""
    cluster, name = on_db.cluster, on_db.name
    api = on_db.factory.start(ORCHESTRATOR_ENGINE="false")
    loop = asyncio.new_event_loop()
    admin: asyncpg.Connection = loop.run_until_complete(asyncpg.connect(cluster.url_of("postgres")))
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    try:
        with api.client() as client:
            assert client.get("/api/jobs").status_code == 200
            os.kill(postmaster, signal.SIGSTOP)
            # The API's sessions end (a session can be ended without the postmaster): it must connect.
            loop.run_until_complete(
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    name,
                )
            )
            unavailable(client.get("/api/jobs"))
            os.kill(postmaster, signal.SIGCONT)
            wait_until(lambda: client.get("/api/jobs").status_code == 200, timeout=120, what="the API back")
        quiet_logs({"api": api.log()}, outages=1)
    finally:
        os.kill(postmaster, signal.SIGCONT)
        loop.run_until_complete(admin.close())
        loop.close()
