"""The PostgreSQL server restarted mid-run, for real: the API says 503 while it is down, the engines
keep their workers and reconnect, nothing acknowledged is lost, no worker starts twice.

It runs a PostgreSQL server of its own (tests/support/pgcluster.py): the shared one must not be
stopped under the rest of the suite.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_engine_lifecycle import log_lines, pid_alive, submit, wait_final, workers_of
from tests.support.pgcluster import PgCluster
from tests.support.servers import ServerFactory, server_factory
from tests.support.servers import test_database_kind as database_kind
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(database_kind() != "postgres", reason="a PostgreSQL server restart")

# The outage the issue names. A deliberate wait, not a guess at how long something takes: the
# database stays down this long whatever the engines do meanwhile.
OUTAGE_SECONDS = 20.0
# Long enough (a work clock: it counts only while the worker runs) to be running before, during and
# after the outage however loaded the host.
LONG_RUN = {"duration_seconds": 40.0}


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    pg = PgCluster().init()
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def on_cluster(tmp_path: Path, cluster: PgCluster) -> Iterator[ServerFactory]:
    with server_factory(tmp_path) as factory:
        factory._database_url = cluster.url  # the private server; dropped with the cluster
        yield factory


def unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["detail"].lower().startswith("database unavailable"), response.text


def worker_starts(client: httpx.Client, job_id: str) -> dict[str, int]:
    """How many times each worker of the job went IDLE -> RUNNING, from its events."""
    events = client.get(f"/api/jobs/{job_id}/events", params={"limit": 1000}).json()["events"]
    starts: dict[str, int] = {}
    for event in events:
        if (
            event["kind"] == "worker.status"
            and event["to_status"] == "RUNNING"
            and event["from_status"] == "IDLE"
        ):
            starts[event["worker_id"]] = starts.get(event["worker_id"], 0) + 1
    return starts


def engines_of(client: httpx.Client, job_id: str) -> set[str]:
    """The engines that changed the job or its workers: one, unless a peer took the job over."""
    events = client.get(f"/api/jobs/{job_id}/events", params={"limit": 1000}).json()["events"]
    return {e["actor"] for e in events if e["actor"].startswith("engine:")}


def test_postgres_restart_mid_run(on_cluster: ServerFactory, cluster: PgCluster) -> None:
    api = on_cluster.start(ORCHESTRATOR_ENGINE="false")
    with contextlib.ExitStack() as stack:
        engines = [stack.enter_context(on_cluster.standalone_engine(api)) for _ in range(2)]
        with api.client() as client:
            running = [submit(client, worker_count=2, agent_options=LONG_RUN) for _ in range(3)]

            def all_running() -> bool:
                workers = [w for job in running for w in workers_of(client, job["id"])]
                return len(workers) == 6 and all(w["status"] == "RUNNING" and w["pid"] for w in workers)

            wait_until(all_running, timeout=120, what="six workers running")
            before = {w["id"]: w for job in running for w in workers_of(client, job["id"])}
            # Acknowledged (201) just before the outage: they must run, whether or not they started.
            queued = [
                submit(client, worker_count=1, agent_options={"duration_seconds": 0.5}) for _ in range(4)
            ]

        cluster.stop()
        down_since = time.monotonic()
        # While it is down the API answers at once, with a 503 that says why; the client's timeout
        # (30 s) is the bound on "at once": a hang fails the test.
        with api.client() as client:
            unavailable(client.get("/api/jobs"))
            unavailable(client.get(f"/api/jobs/{running[0]['id']}"))
            unavailable(client.post("/api/jobs/submit", json={"task_description": "during the outage"}))
            unavailable(client.get("/api/supervisor/workers"))
            ready = client.get("/ready")
            assert ready.status_code == 503, ready.text
            assert ready.json()["reason"].startswith("database unreachable"), ready.text
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_since)))
        for engine in engines:
            assert engine.poll() is None, "an engine died while the database was down"
        assert all(pid_alive(w["pid"]) for w in before.values() if w["pid"]), (
            "a worker died with the database"
        )
        cluster.start()

        with api.client() as client:
            wait_until(lambda: client.get("/api/jobs").status_code == 200, timeout=120, what="the API back")
            for job in running + queued:
                done = wait_final(client, job["id"], timeout=300)
                assert done["status"] == "COMPLETED", done
            for job in running:
                for worker in workers_of(client, job["id"]):
                    assert worker["status"] == "COMPLETED" and worker["exit_code"] == 0, worker
                    assert worker["pid"] == before[worker["id"]]["pid"], "the worker was started again"
                    steps = [line for line in log_lines(client, worker["id"]) if "working... step" in line]
                    numbers = [int(line.split("step ")[1].split()[0]) for line in steps]
                    assert numbers == list(range(1, len(numbers) + 1)), "log lines lost or duplicated"
            for job in running + queued:
                starts = worker_starts(client, job["id"])
                assert sorted(starts.values()) == [1] * job["worker_count"], (job["id"], starts)
                assert len(engines_of(client, job["id"])) == 1, "an engine took over a live peer's job"
            usage = client.get("/api/resources/usage").json()["usage"]
            assert [row["allocated"] for row in usage] == [0] * len(usage)
        for engine in engines:
            assert engine.poll() is None, "an engine died after the database came back"
        for log in Path(on_cluster.root).glob("engine-*.log"):
            assert "taking over" not in log.read_text(errors="replace"), "an engine declared a live peer dead"
