"""Wake-ups are event driven across processes: PostgreSQL NOTIFY, or SQLite's data_version.

The standalone engine below polls only every 600 s, so anything done within the tests' deadlines
(at most 300 s: generous on a loaded host, still well short of a poll) proves the wake-up path.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_engine_lifecycle import agents_file, submit, wait_final, workers_of
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

WITHIN_A_POLL = 300.0  # half the engine's poll interval below


@pytest.fixture
def api_and_engine(servers: ServerFactory) -> Iterator[tuple[Server, subprocess.Popen[bytes]]]:
    profiles = agents_file(servers.root)
    api = servers.start(ORCHESTRATOR_ENGINE="false", ORCHESTRATOR_AGENTS_FILE=profiles)
    with servers.standalone_engine(
        api, ORCHESTRATOR_AGENTS_FILE=profiles, ORCHESTRATOR_POLL_SECONDS="600"
    ) as engine:
        time.sleep(0.3)  # past the engine's first pass
        yield api, engine


def test_standalone_engine_starts_jobs_and_applies_control_without_polling(
    api_and_engine: tuple[Server, subprocess.Popen[bytes]],
) -> None:
    api, _engine = api_and_engine
    with api.client() as client:
        # Started, run and settled well before the engine's 600 s poll: it woke on the commit.
        job = submit(client, agent_options={"duration_seconds": 0})
        assert wait_final(client, job["id"], timeout=WITHIN_A_POLL)["status"] == "COMPLETED"

        ticker = submit(client, agent="ticker")
        worker = wait_until(
            lambda: next((w for w in workers_of(client, ticker["id"]) if w["status"] == "RUNNING"), None),
            timeout=WITHIN_A_POLL,
        )
        assert client.post(f"/api/supervisor/workers/{worker['id']}/pause").status_code == 200
        stat = Path(f"/proc/{worker['pid']}/stat")
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", timeout=WITHIN_A_POLL)
        client.post(f"/api/jobs/{ticker['id']}/cancel")
        assert wait_final(client, ticker["id"], timeout=WITHIN_A_POLL)["status"] == "CANCELED"


def test_a_waiting_worker_learns_of_its_childs_end_from_the_events_stream(
    api_and_engine: tuple[Server, subprocess.Popen[bytes]],
) -> None:
    """Here a waiting simulated worker reads its children's status again only every 600 s, so the
    tree completes in seconds only because each child's events stream (served by the API, while
    another process runs the jobs) tells the worker waiting for it when its tree has ended."""
    api, _engine = api_and_engine
    leaf = {"duration_seconds": 0, "wait_poll_seconds": 600}
    middle = {**leaf, "subtasks": [{"task_description": "leaf", "agent_options": leaf}]}
    root = {**leaf, "subtasks": [{"task_description": "middle", "agent_options": middle}, "second leaf"]}
    with api.client() as client:
        job = submit(client, agent_options=root)
        assert wait_final(client, job["id"], timeout=WITHIN_A_POLL)["status"] == "COMPLETED"
        children = client.get("/api/jobs", params={"parent_job_id": job["id"]}).json()["jobs"]
        assert sorted(c["status"] for c in children) == ["COMPLETED", "COMPLETED"]
