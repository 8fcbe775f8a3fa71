"""Allocate answers what the job holds for the request, whoever took the slots (issue 20, item 17).

The guide's "Complete Workflow" submits a job and then allocates slots for it; with the engine on,
the engine has usually bound the job's slots to its workers already. `granted` is what the job
holds for the request (explicit slots plus those bound to its workers), never more than requested,
than its `worker_count` or than the quota; `newly_allocated` is what this very call took (the
ledger figure); release says what it returned, what stays bound and why.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from orchestrator.core.auth import create_access_token
from tests.support.checks import no_server_errors
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

ALL_SIX = [
    "supervisor:read",
    "supervisor:write",
    "jobs:read",
    "jobs:write",
    "resources:read",
    "resources:write",
]
# The default agent of the live server: works until the test creates its gate file, so the test
# (not the machine's load) decides when the guide's job finishes.
GATED_PROFILE = """
[agents.gated]
type = "command"
command = ["sh", "-c", 'echo waiting; while [ ! -e "{gate}" ]; do sleep 0.05; done; echo done']
ro_binds = ["{gate_dir}"]  # the gate's directory, seen from inside the worker sandbox
"""


@pytest.fixture(autouse=True)
def _no_500s(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from no_server_errors(request)


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    # A directory of its own, readable by the sandboxed agent's uid (pytest's are 0700).
    gates = tmp_path / "gates"
    gates.mkdir()
    gates.chmod(0o755)
    return gates / "gate-open"


@pytest.fixture
def live(servers: ServerFactory, gate: Path) -> Server:
    """Engine on, jobs run by default with the gated agent."""
    profiles = servers.root / "agents.toml"
    profiles.write_text(GATED_PROFILE.replace("{gate}", str(gate)).replace("{gate_dir}", str(gate.parent)))
    return servers.start(ORCHESTRATOR_AGENTS_FILE=str(profiles), ORCHESTRATOR_DEFAULT_AGENT="gated")


@pytest.fixture
def api(servers: ServerFactory) -> Server:
    """Engine off: only the test's requests move slots."""
    return servers.start(ORCHESTRATOR_ENGINE="false")


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {create_access_token(user_id='test-user', scopes=ALL_SIX)}"}


def usage_at(server: Server, depth: int) -> dict[str, Any]:
    rows = requests.get(f"{server.url}/api/resources/usage", headers=headers()).json()["usage"]
    row: dict[str, Any] = next(u for u in rows if u["depth"] == depth)
    return row


def allocate(server: Server, job_id: str, depth: int, count: int) -> dict[str, Any]:
    r = requests.post(
        f"{server.url}/api/resources/allocate",
        headers=headers(),
        json={"job_id": job_id, "depth": depth, "worker_count": count},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def release(server: Server, job_id: str, depth: int) -> dict[str, Any]:
    r = requests.post(
        f"{server.url}/api/resources/release", headers=headers(), json={"job_id": job_id, "depth": depth}
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def submit(server: Server, **body: Any) -> str:
    body.setdefault("task_description", "allocation test")
    r = requests.post(f"{server.url}/api/jobs/submit", headers=headers(), json=body)
    assert r.status_code == 201, r.text
    job_id: str = r.json()["id"]
    return job_id


def workers_of(server: Server, job_id: str) -> list[dict[str, Any]]:
    r = requests.get(f"{server.url}/api/supervisor/workers", headers=headers(), params={"job_id": job_id})
    workers: list[dict[str, Any]] = r.json()["workers"]
    return workers


def test_complete_workflow_prints_the_workers_the_reader_expects(
    live: Server, gate: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The guide's Complete Workflow, run as written, after the engine bound the job's slots."""
    API_BASE = live.url
    headers_ = headers()

    # 1. Submit a Job (verbatim)
    response = requests.post(
        f"{API_BASE}/api/jobs/submit",
        headers=headers_,
        json={"task_description": "Build React dashboard", "worker_count": 2, "depth": 0},
    )
    job = response.json()
    job_id = job["id"]
    print(f"Job created: {job_id}")

    # The situation the issue reports: the engine was faster than the reader's next call.
    wait_until(
        lambda: [w["status"] for w in workers_of(live, job_id)] == ["RUNNING", "RUNNING"],
        timeout=60,
        what="both workers running (their slots bound by the engine)",
    )
    assert usage_at(live, 0)["allocated"] == 2

    # 2. Allocate Resources (verbatim)
    response = requests.post(
        f"{API_BASE}/api/resources/allocate",
        headers=headers_,
        json={"job_id": job_id, "depth": 0, "worker_count": 2},
    )
    allocation = response.json()
    print(f"Resources allocated: {allocation['granted']} workers")

    assert response.status_code == 200, response.text
    assert "Resources allocated: 2 workers" in capsys.readouterr().out
    assert allocation["requested"] == 2 and allocation["granted"] == 2
    assert allocation["newly_allocated"] == 0, "the engine took the slots, not this call"
    assert allocation["bound_to_workers"] == 2 and allocation["held"] == 2
    assert usage_at(live, 0)["allocated"] == 2, "an allocate must not take slots the job holds already"

    # While the workers run, their slots stay theirs; release says so.
    early = release(live, job_id, 0)
    assert (early["released"], early["still_bound"]) == (0, 2), early
    assert "bound" in early["reason"] and "running" in early["reason"], early

    gate.touch()

    # 3. Monitor Progress
    def finished() -> bool:
        status = requests.get(f"{API_BASE}/api/jobs/{job_id}", headers=headers_).json()["status"]
        return status in ["COMPLETED", "FAILED", "CANCELED"]

    wait_until(finished, timeout=60, interval=0.2, what=f"job {job_id} to finish")
    assert requests.get(f"{API_BASE}/api/jobs/{job_id}", headers=headers_).json()["status"] == "COMPLETED"

    # 4. Release Resources (verbatim): nothing left to return, and the answer says why.
    response = requests.post(
        f"{API_BASE}/api/resources/release",
        headers=headers_,
        json={"job_id": job_id, "depth": 0},
    )
    print("Resources released")
    assert response.status_code == 200, response.text
    done = response.json()
    assert (done["released"], done["still_bound"]) == (0, 0), done
    assert done["reason"], done
    assert usage_at(live, 0)["allocated"] == 0


def test_allocate_before_the_engine_binds_then_the_workers_use_those_slots(live: Server, gate: Path) -> None:
    """Slots allocated by the call are the ones the engine gives the workers: never twice."""
    blocker = submit(live, task_description="holds the 10 depth-0 slots but 2", worker_count=8)
    wait_until(lambda: usage_at(live, 0)["allocated"] == 8, timeout=60, what="8 slots bound")
    job_id = submit(live, worker_count=2)
    first = allocate(live, job_id, 0, 2)
    assert first["granted"] == 2 and first["held"] == 2, first
    assert first["newly_allocated"] + first["bound_to_workers"] <= 2, first
    wait_until(
        lambda: [w["status"] for w in workers_of(live, job_id)] == ["RUNNING", "RUNNING"],
        timeout=60,
        what="the job's workers running on its slots",
    )
    again = allocate(live, job_id, 0, 2)
    assert (again["granted"], again["newly_allocated"], again["bound_to_workers"]) == (2, 0, 2), again
    assert usage_at(live, 0)["allocated"] == 10
    gate.touch()
    for jid in (blocker, job_id):
        wait_until(
            lambda j=jid: (
                requests.get(f"{live.url}/api/jobs/{j}", headers=headers()).json()["status"] == "COMPLETED"
            ),
            timeout=60,
            what=f"job {jid} completed",
        )
    wait_until(lambda: usage_at(live, 0)["allocated"] == 0, timeout=30, what="slots back")


def test_allocate_is_idempotent_and_bounded(api: Server) -> None:
    job_id = submit(api, worker_count=3, depth=2)
    start = usage_at(api, 2)["allocated"]

    first = allocate(api, job_id, 2, 2)
    assert first == {
        "job_id": job_id,
        "depth": 2,
        "requested": 2,
        "granted": 2,
        "newly_allocated": 2,
        "bound_to_workers": 0,
        "held": 2,
    }
    again = allocate(api, job_id, 2, 2)
    assert (again["granted"], again["newly_allocated"], again["held"]) == (2, 0, 2), again
    assert usage_at(api, 2)["allocated"] == start + 2, "asking again must not take more"

    fewer = allocate(api, job_id, 2, 1)
    assert (fewer["granted"], fewer["newly_allocated"], fewer["held"]) == (1, 0, 2), fewer

    more = allocate(api, job_id, 2, 50)
    assert (more["granted"], more["newly_allocated"], more["held"]) == (3, 1, 3), more
    assert usage_at(api, 2)["allocated"] == start + 3, "never more than the job's worker_count"

    # The depth-2 quota is 5: another job gets only what is left, and asking again changes nothing.
    other = submit(api, worker_count=5, depth=2)
    partial = allocate(api, other, 2, 5)
    assert (partial["granted"], partial["newly_allocated"], partial["held"]) == (2, 2, 2), partial
    assert usage_at(api, 2)["allocated"] == 5
    full = allocate(api, other, 2, 5)
    assert (full["granted"], full["newly_allocated"]) == (2, 0), full

    released = release(api, job_id, 2)
    assert (released["released"], released["still_bound"]) == (3, 0), released
    assert "3" in released["reason"], released
    nothing = release(api, job_id, 2)
    assert (nothing["released"], nothing["still_bound"]) == (0, 0), nothing
    assert nothing["reason"] and nothing["reason"] != released["reason"]
    # The freed slots go to the job still short of its request.
    topped = allocate(api, other, 2, 5)
    assert (topped["granted"], topped["newly_allocated"], topped["held"]) == (5, 3, 5), topped
    release(api, other, 2)
    assert usage_at(api, 2)["allocated"] == start


def test_concurrent_allocates_of_one_job_take_its_request_once(api: Server) -> None:
    """Eight identical allocates at the same instant: the job ends up holding the request once."""
    job_id = submit(api, worker_count=5, depth=1)
    contenders = 8
    barrier = threading.Barrier(contenders)
    sessions = [requests.Session() for _ in range(contenders)]
    for s in sessions:  # connect first, so the barrier releases requests, not handshakes
        assert s.get(f"{api.url}/health").status_code == 200

    def one(s: requests.Session) -> dict[str, Any]:
        barrier.wait(30)
        r = s.post(
            f"{api.url}/api/resources/allocate",
            headers=headers(),
            json={"job_id": job_id, "depth": 1, "worker_count": 3},
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    try:
        with ThreadPoolExecutor(contenders) as pool:
            answers = list(pool.map(one, sessions))
    finally:
        for s in sessions:
            s.close()
    assert sum(a["newly_allocated"] for a in answers) == 3, answers
    assert all(a["granted"] == 3 for a in answers), answers
    assert usage_at(api, 1)["allocated"] == 3
    assert release(api, job_id, 1)["released"] == 3
