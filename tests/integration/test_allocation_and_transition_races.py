"""No over-allocation, ever, and state changes that race: exactly one wins.

The server runs 4 uvicorn processes (`--workers 4`, the guide's production line) on one database;
the load comes from several OS processes at once. Runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support.checks import no_server_errors
from tests.support.db import seed_worker
from tests.support.hammer import allocate_calls, fire
from tests.support.servers import Server, ServerFactory, server_factory, token
from tests.support.wait import wait_until

DEPTH = 2
QUOTA = 5  # depth 2's quota in the default ORCHESTRATOR_QUOTAS
JOBS = 12
PROCESSES = 4


@pytest.fixture(autouse=True)
def _no_500s(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from no_server_errors(request)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """4 uvicorn processes, engine off: only the test's requests change anything."""
    with server_factory(tmp_path_factory.mktemp("farm")) as factory:
        yield factory.start(workers=4, ORCHESTRATOR_ENGINE="false")


def depth_usage(client: httpx.Client, depth: int = DEPTH) -> dict[str, int]:
    rows = client.get("/api/resources/usage").json()["usage"]
    row: dict[str, int] = next(r for r in rows if r["depth"] == depth)
    return row


class UsageWatcher:
    """Reads usage in a loop while the load runs; records every violation it sees."""

    def __init__(self, server: Server) -> None:
        self.client = server.client()
        self.violations: list[dict[str, int]] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            row = depth_usage(self.client)
            self.reads += 1
            if not (0 <= row["allocated"] <= QUOTA and row["allocated"] + row["available"] == QUOTA):
                self.violations.append(row)

    def __enter__(self) -> UsageWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()


def run_in_processes(server: Server, batches: list[list[dict[str, Any]]], threads: int = 16) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    args = [(server.url, token(), batch, threads) for batch in batches]
    with ctx.Pool(len(batches)) as pool:
        results = pool.map(fire, args)
    return [item for batch in results for item in batch]


def test_concurrent_allocations_never_exceed_the_quota(servers: ServerFactory) -> None:
    farm = servers.start(workers=4, ORCHESTRATOR_ENGINE="false")
    with farm.client() as client:
        jobs = []
        for i in range(JOBS):
            r = client.post(
                "/api/jobs/submit",
                json={"task_description": f"contender {i}", "worker_count": QUOTA, "depth": DEPTH},
            )
            assert r.status_code == 201, r.text
            jobs.append(r.json()["id"])
        assert depth_usage(client)["allocated"] == 0

        # Phase 1: only allocations, demand (12 jobs x 5) far above the quota (5).
        batches = [allocate_calls(jobs, DEPTH, 60, seed, QUOTA) for seed in range(PROCESSES)]
        with UsageWatcher(farm) as watcher:
            results = run_in_processes(farm, batches)
        assert watcher.reads > 0 and watcher.violations == []
        assert len(results) == PROCESSES * 60
        assert {status for status, _ in results} == {200}, [r for r in results if r[0] != 200][:5]
        per_job: dict[str, int] = defaultdict(int)
        for _, body in results:
            # `granted` is what the job holds for the request (idempotent); `newly_allocated` is
            # what the call took: the ledger figure.
            assert 0 <= body["newly_allocated"] <= body["granted"] <= body["requested"]
            assert body["granted"] == min(body["requested"], body["held"]) and body["held"] <= QUOTA
            per_job[body["job_id"]] += body["newly_allocated"]
        total = sum(per_job.values())
        assert total <= QUOTA, f"over-allocation: granted {total} > quota {QUOTA}: {dict(per_job)}"
        assert all(v <= QUOTA for v in per_job.values()), per_job
        assert depth_usage(client) == {
            "depth": DEPTH,
            "allocated": total,
            "available": QUOTA - total,
            "max_workers": QUOTA,
        }

        # Top up sequentially: the pool fills to exactly the quota, never beyond.
        for job_id in jobs:
            r = client.post(
                "/api/resources/allocate", json={"job_id": job_id, "depth": DEPTH, "worker_count": QUOTA}
            )
            per_job[job_id] += r.json()["newly_allocated"]
        assert sum(per_job.values()) == QUOTA == depth_usage(client)["allocated"]

        # Phase 2: allocations and releases mixed; the ledger must match the counter exactly.
        mixed: list[list[dict[str, Any]]] = []
        for seed in range(PROCESSES):
            calls = allocate_calls(jobs, DEPTH, 40, 100 + seed, QUOTA)
            for i in range(0, len(calls), 3):
                calls[i] = {
                    "path": "/api/resources/release",
                    "body": {"job_id": calls[i]["body"]["job_id"], "depth": 2},
                }
            mixed.append(calls)
        with UsageWatcher(farm) as watcher:
            results = run_in_processes(farm, mixed)
        assert watcher.violations == []
        assert {status for status, _ in results} == {200}, [r for r in results if r[0] != 200][:5]
        for _, body in results:
            if "granted" in body:
                per_job[body["job_id"]] += body["newly_allocated"]
            else:
                per_job[body["job_id"]] -= body["released"]
        assert all(0 <= v <= QUOTA for v in per_job.values()), per_job
        held = sum(per_job.values())
        assert 0 <= held <= QUOTA
        assert depth_usage(client)["allocated"] == held

        # Phase 3: release everything, three times per job, concurrently.
        releases = [
            [{"path": "/api/resources/release", "body": {"job_id": j, "depth": DEPTH}} for j in jobs]
            for _ in range(3)
        ]
        results = run_in_processes(farm, releases, threads=12)
        assert {status for status, _ in results} == {200}
        released: dict[str, list[int]] = defaultdict(list)
        for _, body in results:
            released[body["job_id"]].append(body["released"])
        for job_id in jobs:
            assert sum(released[job_id]) == per_job[job_id], (job_id, released[job_id], per_job[job_id])
            assert sum(1 for n in released[job_id] if n) <= 1, released[job_id]
        assert depth_usage(client) == {
            "depth": DEPTH,
            "allocated": 0,
            "available": QUOTA,
            "max_workers": QUOTA,
        }


def test_allocate_and_release_racing_on_the_same_jobs(farm: Server) -> None:
    """Allocations and releases of the same two jobs at once: no deadlock, no error, exact ledger."""
    with farm.client() as client:
        jobs = [
            client.post(
                "/api/jobs/submit", json={"task_description": f"tug {i}", "worker_count": 3, "depth": 3}
            ).json()["id"]
            for i in range(2)
        ]
        batches = []
        for seed in range(PROCESSES):
            calls = allocate_calls(jobs, 3, 50, 1000 + seed, 3)
            for i in range(1, len(calls), 2):
                calls[i] = {
                    "path": "/api/resources/release",
                    "body": {"job_id": calls[i]["body"]["job_id"], "depth": 3},
                }
            batches.append(calls)
        results = run_in_processes(farm, batches)
        assert {status for status, _ in results} == {200}, [r for r in results if r[0] != 200][:5]
        ledger = sum(b["newly_allocated"] if "granted" in b else -b["released"] for _, b in results)
        assert 0 <= ledger <= 3 == depth_usage(client, 3)["max_workers"]
        assert depth_usage(client, 3)["allocated"] == ledger
        for job_id in jobs:
            client.post("/api/resources/release", json={"job_id": job_id, "depth": 3})
        assert depth_usage(client, 3)["allocated"] == 0


def race(server: Server, path: str, contenders: int = 8) -> list[httpx.Response]:
    """`contenders` POSTs to `path` released at the same instant, on separate connections."""
    barrier = threading.Barrier(contenders)
    clients = [server.client() for _ in range(contenders)]
    for c in clients:  # connect first, so the barrier releases requests, not handshakes
        assert c.get("/health").status_code == 200

    def one(c: httpx.Client) -> httpx.Response:
        barrier.wait(30)
        return c.post(path)

    try:
        with ThreadPoolExecutor(contenders) as pool:
            return list(pool.map(one, clients))
    finally:
        for c in clients:
            c.close()


def exactly_one_wins(responses: list[httpx.Response], loser_detail: str) -> dict[str, Any]:
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [400] * (len(responses) - 1), [(r.status_code, r.text) for r in responses]
    for r in responses:
        if r.status_code == 400:
            assert loser_detail in r.json()["detail"], r.json()
    winner: dict[str, Any] = next(r for r in responses if r.status_code == 200).json()
    return winner


@pytest.fixture
def farm_client(farm: Server) -> Iterator[httpx.Client]:
    with farm.client() as client:
        yield client


def test_concurrent_cancels_exactly_one_wins(farm: Server, farm_client: httpx.Client) -> None:
    for round_ in range(5):
        job = farm_client.post("/api/jobs/submit", json={"task_description": f"cancel race {round_}"}).json()
        winner = exactly_one_wins(race(farm, f"/api/jobs/{job['id']}/cancel"), "CANCELED -> CANCELED")
        assert winner["status"] == "CANCELED"
        events = farm_client.get(f"/api/jobs/{job['id']}/events").json()["events"]
        transitions = [(e["from_status"], e["to_status"]) for e in events if e["kind"] == "job.status"]
        assert transitions == [(None, "PENDING"), ("PENDING", "CANCELED")]


def _worker_race(
    farm: Server,
    client: httpx.Client,
    start: str,
    action: str,
    outcome: str,
) -> None:
    job = client.post("/api/jobs/submit", json={"task_description": f"{action} race"}).json()
    worker_id = seed_worker(farm, job["id"], start)
    winner = exactly_one_wins(
        race(farm, f"/api/supervisor/workers/{worker_id}/{action}"), f"{outcome} -> {outcome}"
    )
    assert winner["status"] == outcome
    events = client.get(f"/api/jobs/{job['id']}/events").json()["events"]
    assert [(e["from_status"], e["to_status"]) for e in events if e["worker_id"] == worker_id] == [
        (start, outcome)
    ]


@pytest.mark.parametrize(
    ("start", "action", "outcome"),
    [
        ("RUNNING", "terminate", "TERMINATED"),
        ("PAUSED", "terminate", "TERMINATED"),
        ("IDLE", "terminate", "TERMINATED"),
        ("RUNNING", "pause", "PAUSED"),
        ("PAUSED", "resume", "RUNNING"),
    ],
)
def test_concurrent_worker_control_exactly_one_wins(
    farm: Server, farm_client: httpx.Client, start: str, action: str, outcome: str
) -> None:
    for _ in range(3):
        _worker_race(farm, farm_client, start, action, outcome)


def _race_child_submits_with_a_cancel(server: Server, client: httpx.Client, round_: int) -> None:
    """Children and grandchildren submitted from 4 processes while the root is canceled, under
    budgets at two levels (their checks lock ancestors too): each submit either lands in the tree,
    which the cancel then finds, or is refused because its parent is canceled; never a 5xx (no
    deadlock), and the tree ends all CANCELED."""
    busy = {"agent_options": {"duration_seconds": 30}}
    root = client.post(
        "/api/jobs/submit", json={"task_description": f"root {round_}", "max_cost_usd": 10, **busy}
    ).json()
    middle = client.post(
        "/api/jobs/submit",
        json={
            "task_description": "middle",
            "depth": 1,
            "parent_job_id": root["id"],
            "max_cost_usd": 5,
            **busy,
        },
    ).json()
    calls: list[dict[str, Any]] = []
    for i in range(24):
        parent, depth = (root["id"], 1) if i % 2 else (middle["id"], 2)
        body = {"task_description": f"child {i}", "depth": depth, "parent_job_id": parent, **busy}
        calls.append({"path": "/api/jobs/submit", "body": {**body, "max_cost_usd": 0.01}})
    batches = [calls[i::PROCESSES] for i in range(PROCESSES)]
    batches[round_ % PROCESSES].insert(3, {"path": f"/api/jobs/{root['id']}/cancel", "body": {}})
    results = run_in_processes(server, batches, threads=4)
    refused = [body["detail"] for status, body in results if status == 400]
    assert {status for status, _ in results} <= {200, 201, 400}, results
    assert all("CANCELED; it cannot take new child jobs" in detail for detail in refused), refused
    children = [
        job
        for parent in (root["id"], middle["id"])
        for job in client.get("/api/jobs", params={"parent_job_id": parent, "limit": 100}).json()["jobs"]
    ]
    landed = {body["id"] for status, body in results if status == 201}
    assert len(landed) + len(refused) == 24
    assert {job["id"] for job in children} == landed | {middle["id"]}
    statuses = {job["id"]: job["status"] for job in children}
    statuses[root["id"]] = client.get(f"/api/jobs/{root['id']}").json()["status"]
    assert set(statuses.values()) == {"CANCELED"}, statuses


def test_child_submits_racing_a_cancel_leave_no_child_behind(farm: Server, farm_client: httpx.Client) -> None:
    for round_ in range(3):
        _race_child_submits_with_a_cancel(farm, farm_client, round_)


def test_the_same_race_while_engines_run_the_tree(servers: ServerFactory) -> None:
    """As above with 2 processes each running an engine, so the tree's workers are starting and
    being stopped while the submits and the cancel race (the engine locks worker rows, then job
    rows; the tree lock must not close a cycle with that). Every worker then ends and every slot
    comes back."""
    server = servers.start(workers=2)
    with server.client() as client:
        for round_ in range(2):
            _race_child_submits_with_a_cancel(server, client, round_)

        def settled() -> bool:
            workers = client.get("/api/supervisor/workers", params={"limit": 1000}).json()["workers"]
            usage = client.get("/api/resources/usage").json()["usage"]
            return all(w["status"] not in ("IDLE", "RUNNING", "PAUSED") for w in workers) and all(
                row["allocated"] == 0 for row in usage
            )

        wait_until(settled, timeout=60, what="every worker ended and every slot returned")
