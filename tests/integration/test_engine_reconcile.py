"""An engine killed between an API call and its signal: the next engine makes the processes follow
the recorded statuses, both ways (issue 20, item 5).

The API runs without an engine; a standalone `orchestrator engine` supervises the workers and is
`kill -9`ed, then the API records a resume, a pause, a terminate or a cancel that no engine
applies; a new engine adopts the workers and must apply them, reading each process's real state.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.integration.test_engine_lifecycle import (
    agents_file,
    submit,
    usage_allocated,
    wait_final,
    workers_of,
)
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until


def group_states(pgid: int) -> list[str]:
    """The state letter (/proc/PID/stat field 3) of every process of a process group."""
    states = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            states.append(fields[0])
    return states


def stopped(pgid: int) -> bool:
    """Every process of the group stopped. A child that exited just before the group's SIGSTOP
    stays a zombie (Z) until its stopped shell reaps it, after the resume: the ticker's `sleep`
    does so in about one stop in a hundred, so a zombie counts as stopped."""
    states = group_states(pgid)
    return any(s in "Tt" for s in states) and all(s in "TtZX" for s in states)


def running(pgid: int) -> bool:
    states = group_states(pgid)
    return bool(states) and not any(s in "Tt" for s in states)


def test_lost_resume_pause_and_terminate_are_applied_by_the_next_engine(servers: ServerFactory) -> None:
    profiles = agents_file(servers.root)
    api = servers.start(ORCHESTRATOR_ENGINE="false", ORCHESTRATOR_AGENTS_FILE=profiles)
    with api.client() as client:
        job = submit(client, agent="ticker", worker_count=3)
        with servers.standalone_engine(api, ORCHESTRATOR_AGENTS_FILE=profiles) as engine:
            workers = wait_until(
                lambda: (
                    (ws := workers_of(client, job["id"]))
                    and all(w["status"] == "RUNNING" and w["pid"] for w in ws)
                    and len(ws) == 3
                    and ws
                ),
                timeout=60,
                what="three workers running",
            )
            resumed, paused, terminated = sorted(workers, key=lambda w: w["worker_index"])
            assert client.post(f"/api/supervisor/workers/{resumed['id']}/pause").status_code == 200
            wait_until(lambda: stopped(resumed["pid"]), timeout=30, what="the first worker stopped")
            engine.kill()  # kill -9: no engine applies what the API records next
            engine.wait()

        # Recorded, never applied.
        r = client.post(f"/api/supervisor/workers/{resumed['id']}/resume")
        assert r.status_code == 200 and r.json()["status"] == "RUNNING", r.text
        assert client.post(f"/api/supervisor/workers/{paused['id']}/pause").status_code == 200
        assert client.post(f"/api/supervisor/workers/{terminated['id']}/terminate").status_code == 200
        assert stopped(resumed["pid"]) and running(paused["pid"]) and running(terminated["pid"])

        with servers.standalone_engine(api, ORCHESTRATOR_AGENTS_FILE=profiles):
            wait_until(lambda: running(resumed["pid"]), timeout=30, what="the lost resume applied")
            wait_until(lambda: stopped(paused["pid"]), timeout=30, what="the lost pause applied")
            wait_until(
                lambda: not group_states(terminated["pid"]), timeout=30, what="the lost terminate applied"
            )
            wait_until(lambda: usage_allocated(client)[0] == 2, timeout=30, what="its slot back")
            by_id = {w["id"]: w for w in workers_of(client, job["id"])}
            assert by_id[resumed["id"]]["status"] == "RUNNING"
            assert by_id[paused["id"]]["status"] == "PAUSED"
            assert by_id[terminated["id"]]["status"] == "TERMINATED"
            # The resumed worker really works again: its output grows.
            output = Path(api.env["ORCHESTRATOR_DATA_DIR"]) / "runs" / resumed["id"] / "output.log"
            size = output.stat().st_size
            wait_until(lambda: output.stat().st_size > size, timeout=30, what="the resumed worker ticking")
            assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
            assert wait_final(client, job["id"], timeout=30)["status"] == "CANCELED"
            wait_until(lambda: usage_allocated(client)[0] == 0, timeout=30, what="all slots back")
            for worker in workers:
                wait_until(lambda w=worker: not group_states(w["pid"]), timeout=30, what="every worker gone")


def test_lost_cancel_of_a_paused_job_is_applied_by_the_next_engine(servers: ServerFactory) -> None:
    """The job is CANCELED (final) while no engine runs: its workers' processes, one of them
    stopped, must still be ended and their slots returned."""
    profiles = agents_file(servers.root)
    api = servers.start(ORCHESTRATOR_ENGINE="false", ORCHESTRATOR_AGENTS_FILE=profiles)
    with api.client() as client:
        job = submit(client, agent="ticker", worker_count=2)
        with servers.standalone_engine(api, ORCHESTRATOR_AGENTS_FILE=profiles) as engine:
            workers = wait_until(
                lambda: (
                    (ws := workers_of(client, job["id"]))
                    and len(ws) == 2
                    and all(w["status"] == "RUNNING" and w["pid"] for w in ws)
                    and ws
                ),
                timeout=60,
                what="two workers running",
            )
            assert client.post(f"/api/supervisor/workers/{workers[0]['id']}/pause").status_code == 200
            wait_until(lambda: stopped(workers[0]["pid"]), timeout=30, what="one worker stopped")
            engine.kill()
            engine.wait()

        assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
        assert usage_allocated(client)[0] == 2, "the workers hold their slots until they end"

        with servers.standalone_engine(api, ORCHESTRATOR_AGENTS_FILE=profiles):
            for worker in workers:
                wait_until(lambda w=worker: not group_states(w["pid"]), timeout=30, what="workers ended")
            wait_until(lambda: usage_allocated(client)[0] == 0, timeout=30, what="slots back")
            assert {w["status"] for w in workers_of(client, job["id"])} == {"TERMINATED"}
            assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "CANCELED"
