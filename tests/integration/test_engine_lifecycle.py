"""The engine runs jobs for real: worker processes, outcomes, control signals, trees and quotas."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.checks import session_processes
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

FINAL = {"COMPLETED", "FAILED", "CANCELED"}

TICKER_PROFILE = """
[agents.ticker]
type = "command"
command = ["bash", "-c", "sleep 1000 & echo $! > grandchild.pid; while true; do echo tick; sleep 0.05; done"]

[agents.echo]
type = "command"
command = ["bash", "-c", "echo task=$(cat); env | grep -E '^(ORCHESTRATOR_|WORKER_|HOME=)' | sort; exit ${EXIT:-0}"]

[agents.fail]
type = "command"
command = ["bash", "-c", "echo failing; exit 3"]
"""


def agents_file(root: Path) -> str:
    path = root / "agents.toml"
    path.write_text(TICKER_PROFILE)
    return str(path)


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("task_description", "test task")
    response = client.post("/api/jobs/submit", json=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def job_status(client: httpx.Client, job_id: str) -> str:
    status: str = client.get(f"/api/jobs/{job_id}").json()["status"]
    return status


def wait_final(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        return job if job["status"] in FINAL else None

    result: dict[str, Any] = wait_until(final, timeout=timeout, interval=0.1, what=f"job {job_id} to finish")
    return result


def workers_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = client.get("/api/supervisor/workers", params={"job_id": job_id}).json()[
        "workers"
    ]
    return sorted(workers, key=lambda w: w["worker_index"])


def log_lines(client: httpx.Client, worker_id: str) -> list[str]:
    body = client.get(f"/api/supervisor/workers/{worker_id}/logs", params={"limit": 10_000}).json()
    return [line["text"] for line in body["lines"]]


def usage_allocated(client: httpx.Client) -> list[int]:
    return [row["allocated"] for row in client.get("/api/resources/usage").json()["usage"]]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes. The process may end between the open and the read,
    # which then fails with ESRCH (ProcessLookupError): gone too.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_simulated_job_completes_with_logs_events_and_env(server: Server) -> None:
    with server.client() as client:
        job = submit(client, worker_count=2, agent_options={"duration_seconds": 0.3})
        done = wait_final(client, job["id"])
        assert done["status"] == "COMPLETED", done
        assert done["started_at"] and done["finished_at"]
        workers = workers_of(client, job["id"])
        assert [w["status"] for w in workers] == ["COMPLETED", "COMPLETED"]
        assert all(w["exit_code"] == 0 for w in workers)
        lines = log_lines(client, workers[1]["id"])
        assert lines[0].startswith("[simulated] worker 2/2 at depth 0 starting: test task")
        assert lines[-1] == "[simulated] done with exit code 0"
        events = client.get(f"/api/jobs/{job['id']}/events").json()["events"]
        job_changes = [(e["from_status"], e["to_status"]) for e in events if e["kind"] == "job.status"]
        assert job_changes == [(None, "PENDING"), ("PENDING", "RUNNING"), ("RUNNING", "COMPLETED")]
        worker_changes = [
            (e["from_status"], e["to_status"])
            for e in events
            if e["kind"] == "worker.status" and e["worker_id"] == workers[0]["id"]
        ]
        assert worker_changes == [(None, "IDLE"), ("IDLE", "RUNNING"), ("RUNNING", "COMPLETED")]
        assert all(e["actor"] and e["created_at"] for e in events)
        assert usage_allocated(client) == [0, 0, 0, 0, 0, 0]


def loaded_libraries(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split()[-1] for line in maps if len(line.split()) >= 6}


def test_a_server_on_the_local_executor_never_loads_ray(server: Server) -> None:
    """Ray is the optional executor: a server (and its engine) that runs its workers itself
    starts, runs a job through every phase and ends it without importing Ray, whose import
    costs each process's start more than the rest of the engine's."""
    with server.client() as client:
        job = submit(client, worker_count=2, agent_options={"duration_seconds": 0.1})
        assert wait_final(client, job["id"])["status"] == "COMPLETED"
        assert client.get("/ready").json()["engine"] == "running"
    assert server.process is not None
    libraries = loaded_libraries(server.process.pid)
    assert any("sqlalchemy" in path or "asyncpg" in path or "pydantic_core" in path for path in libraries)
    assert not [path for path in libraries if "/ray/" in path], "the server loaded Ray"


def test_a_server_without_the_ray_extra_starts_and_runs_jobs(servers: ServerFactory, tmp_path: Path) -> None:
    """Ray is an optional extra (`pip install 'parallel-ai-orchestrator[ray]'`): `make run` and
    the Docker image install without it. Here `import ray` fails in the server as it does where
    the extra is not installed; the server must start, run a job and be ready all the same."""
    hidden = tmp_path / "without-ray" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'ray\' (the extra is not installed)", name="ray")\n'
    )
    path = os.pathsep.join(p for p in [str(hidden.parent), os.environ.get("PYTHONPATH", "")] if p)
    probe = subprocess.run(
        [sys.executable, "-c", "import ray.exceptions"],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "the extra is not installed" in probe.stderr, probe.stderr
    server = servers.start(PYTHONPATH=path)
    with server.client() as client:
        job = submit(client, worker_count=2, agent_options={"duration_seconds": 0.1})
        assert wait_final(client, job["id"])["status"] == "COMPLETED"
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["engine"] == "running", ready.text
    assert "No module named 'ray'" not in server.log() and "Traceback" not in server.log(), server.log()


def test_command_agent_gets_task_on_stdin_and_its_environment(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        job = submit(client, task_description="write the docs", worker_count=2, agent="echo")
        assert wait_final(client, job["id"])["status"] == "COMPLETED"
        workers = workers_of(client, job["id"])
        homes = set()
        for worker in workers:
            lines = log_lines(client, worker["id"])
            assert lines[0] == "task=write the docs"
            env = dict(line.split("=", 1) for line in lines[1:])
            assert env["ORCHESTRATOR_JOB_ID"] == job["id"]
            assert env["ORCHESTRATOR_WORKER_ID"] == worker["id"]
            assert env["ORCHESTRATOR_DEPTH"] == "0"
            assert env["ORCHESTRATOR_URL"] == server.url
            assert env["ORCHESTRATOR_TASK"] == "write the docs"
            assert env["WORKER_INDEX"] == str(worker["worker_index"])
            assert env["WORKER_COUNT"] == "2"
            assert env["ORCHESTRATOR_TOKEN"].count(".") == 2
            homes.add(env["HOME"])
        assert len(homes) == 2, "each worker must have its own HOME"


def test_nonzero_exit_fails_job_with_reason(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        job = submit(client, agent="fail")
        done = wait_final(client, job["id"])
        assert done["status"] == "FAILED"
        (worker,) = workers_of(client, job["id"])
        assert worker["status"] == "FAILED"
        assert worker["exit_code"] == 3
        assert worker["status_reason"] == "exit code 3"
        assert worker["id"] in done["status_reason"] and "exit code 3" in done["status_reason"]
        assert usage_allocated(client)[0] == 0


def test_unknown_agent_and_bad_options_are_422(server: Server) -> None:
    with server.client() as client:
        response = client.post("/api/jobs/submit", json={"task_description": "x", "agent": "nope"})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "agent"]
        response = client.post(
            "/api/jobs/submit", json={"task_description": "x", "agent_options": {"duration_seconds": "slow"}}
        )
        assert response.status_code == 422
        assert "duration_seconds" in response.json()["detail"][0]["msg"]
        response = client.post(
            "/api/jobs/submit", json={"task_description": "x", "agent_options": {"bogus": 1}}
        )
        assert response.status_code == 422


def test_pause_stops_output_resume_continues_terminate_kills_group(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        job = submit(client, agent="ticker")
        worker = wait_until(
            lambda: next((w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"), None),
            what="worker running",
        )
        output = Path(servers.root / "data" / "runs" / worker["id"] / "output.log")
        wait_until(lambda: output.read_text().count("tick") >= 3, what="ticks")

        paused = client.post(f"/api/supervisor/workers/{worker['id']}/pause")
        assert paused.status_code == 200 and paused.json()["status"] == "PAUSED"
        # The signal is applied by the engine right after commit: wait until the process is stopped.
        wait_until(lambda: process_state(worker["pid"]) == "T", timeout=60, what="worker stopped")
        before = output.read_text().count("tick")
        time.sleep(1.0)
        assert output.read_text().count("tick") == before, "a paused worker must produce no output"

        def all_stopped() -> dict[int, tuple[str, str]] | None:
            inside = session_processes(worker["pid"])
            return inside if len(inside) >= 4 and {s for s, _ in inside.values()} == {"T"} else None

        # Every process of the worker (wrapper, bwrap, the sandbox's init, bash, its sleep) is stopped.
        wait_until(all_stopped, timeout=60, what="every process of the worker stopped")

        again = client.post(f"/api/supervisor/workers/{worker['id']}/pause")
        assert again.status_code == 400 and "PAUSED" in again.json()["detail"]

        assert client.post(f"/api/supervisor/workers/{worker['id']}/resume").json()["status"] == "RUNNING"
        wait_until(lambda: output.read_text().count("tick") > before + 3, what="output after resume")
        resume_again = client.post(f"/api/supervisor/workers/{worker['id']}/resume")
        assert resume_again.status_code == 400

        # The grandchild's PID as the host sees it (the sandbox has its own PID namespace).
        grandchild = wait_until(
            lambda: next(
                (p for p, (_, cmd) in session_processes(worker["pid"]).items() if cmd == "sleep 1000"), None
            ),
            what="grandchild",
        )
        assert pid_alive(grandchild)

        terminated = client.post(f"/api/supervisor/workers/{worker['id']}/terminate")
        assert terminated.status_code == 200 and terminated.json()["status"] == "TERMINATED"
        wait_until(lambda: not pid_alive(worker["pid"]), timeout=120, what="worker process gone")
        wait_until(lambda: not pid_alive(grandchild), timeout=120, what="grandchild gone")
        wait_until(lambda: not session_processes(worker["pid"]), timeout=120, what="no process left")
        done = wait_final(client, job["id"])
        assert done["status"] == "FAILED"
        assert "TERMINATED" in done["status_reason"]
        final = client.get(f"/api/supervisor/workers/{worker['id']}").json()
        assert final["status"] == "TERMINATED"
        assert final["status_reason"] == "terminated by user:test-user"
        assert final["exit_code"] == 128 + signal.SIGTERM
        assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 400
        assert usage_allocated(client)[0] == 0


def process_state(pid: int) -> str:
    """The state letter in /proc/PID/stat ("T" when stopped), "" when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def test_a_paused_simulated_worker_counts_only_its_work_time(server: Server) -> None:
    """Paused (SIGSTOP) longer than its whole duration, a simulated worker resumes where it was:
    its work clock did not run while it was stopped, so it keeps working after the resume (it
    used to count the pause as work and end at once) and its steps never report the paused time."""
    duration, paused_for = 2.0, 4.0
    with server.client() as client:
        job = submit(client, agent_options={"duration_seconds": duration, "progress_interval_seconds": 0.1})
        worker = wait_until(
            lambda: next((w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"), None),
            timeout=60,
            what="worker running",
        )
        wait_until(
            lambda: "step 2 " in "\n".join(log_lines(client, worker["id"])), timeout=60, what="working"
        )
        assert client.post(f"/api/supervisor/workers/{worker['id']}/pause").status_code == 200
        wait_until(lambda: process_state(worker["pid"]) == "T", timeout=60, what="worker stopped")
        output = Path(server.env["ORCHESTRATOR_DATA_DIR"]) / "runs" / worker["id"] / "output.log"
        at_pause = output.read_text().splitlines()
        time.sleep(paused_for)  # the worker is stopped for at least this long: longer than its duration
        assert client.post(f"/api/supervisor/workers/{worker['id']}/resume").status_code == 200
        done = wait_final(client, job["id"], timeout=120)
        assert done["status"] == "COMPLETED", done
        lines = output.read_text().splitlines()
    assert lines[: len(at_pause)] == at_pause
    worked_before = [worked_of(line) for line in at_pause if "working..." in line]
    after = [worked_of(line) for line in lines[len(at_pause) :] if "working..." in line]
    assert after, f"no work after the resume: the pause was counted as work\n{lines}"
    # The work clock goes on from where it stopped (at most one step of work before the stop is not
    # counted), not from where the wall clock is.
    assert max(worked_before) <= after[0] < max(worked_before) + paused_for, (worked_before, after)
    # The line shows the work time to one decimal: 1.96 s of work reads "2.0s of 2.0s".
    assert after == sorted(after) and after[-1] <= duration, after


def worked_of(line: str) -> float:
    """The work time a simulated worker's progress line reports: "... step 3 (0.2s of 2.0s)"."""
    return float(line.rsplit("(", 1)[1].split("s of", 1)[0])


def test_terminate_escalates_to_sigkill_after_grace(servers: ServerFactory) -> None:
    profile = servers.root / "stubborn.toml"
    profile.write_text(
        '[agents.stubborn]\ntype = "command"\n'
        'command = ["bash", "-c", "trap \'\' TERM; echo ready; while true; do sleep 0.1; done"]\n'
    )
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=str(profile), ORCHESTRATOR_TERMINATE_GRACE_SECONDS="1")
    with server.client() as client:
        job = submit(client, agent="stubborn")
        worker = wait_until(
            lambda: next((w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"), None)
        )
        wait_until(lambda: "ready" in log_lines(client, worker["id"]))
        started = time.monotonic()
        client.post(f"/api/supervisor/workers/{worker['id']}/terminate")
        wait_until(lambda: not pid_alive(worker["pid"]), timeout=120, what="SIGKILL after the grace period")
        assert time.monotonic() - started >= 0.9
        assert wait_final(client, job["id"])["status"] == "FAILED"
        assert usage_allocated(client)[0] == 0


def test_timeout_fails_worker_with_reason_timeout(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        job = submit(client, agent="ticker", timeout_seconds=1)
        done = wait_final(client, job["id"], timeout=120)
        assert done["status"] == "FAILED"
        (worker,) = workers_of(client, job["id"])
        assert worker["status"] == "FAILED" and worker["status_reason"] == "timeout"


def test_cancel_cascades_through_three_levels(server: Server) -> None:
    with server.client() as client:
        long = {"duration_seconds": 60}
        root = submit(client, agent_options={"duration_seconds": 60})
        child = submit(client, depth=1, parent_job_id=root["id"], agent_options=long)
        grandchild = submit(client, depth=2, parent_job_id=child["id"], worker_count=2, agent_options=long)
        ids = [root["id"], child["id"], grandchild["id"]]
        wait_until(
            lambda: all(job_status(client, i) == "RUNNING" for i in ids),
            timeout=120,
            what="three levels running",
        )
        pids = [w["pid"] for i in ids for w in workers_of(client, i)]
        assert len(pids) == 4 and all(pid_alive(p) for p in pids)

        canceled = client.post(f"/api/jobs/{root['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "CANCELED"
        for job_id in ids:
            assert job_status(client, job_id) == "CANCELED"
            assert {w["status"] for w in workers_of(client, job_id)} == {"TERMINATED"}
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=120, what="all worker processes gone")
        wait_until(lambda: usage_allocated(client) == [0, 0, 0, 0, 0, 0], what="slots freed")
        events = client.get(f"/api/jobs/{root['id']}/events").json()["events"]
        canceled_order = [e["job_id"] for e in events if e["to_status"] == "CANCELED"]
        assert canceled_order == [grandchild["id"], child["id"], root["id"]], "depth first"
        assert client.post(f"/api/jobs/{root['id']}/cancel").status_code == 400


def test_delegation_down_to_depth_five_completes(server: Server) -> None:
    def chain(depth: int) -> dict[str, Any]:
        options: dict[str, Any] = {"duration_seconds": 0.1}
        if depth < 5:
            options["subtasks"] = [
                {"task_description": f"level {depth + 1}", "agent_options": chain(depth + 1)}
            ]
        return options

    with server.client() as client:
        root = submit(client, worker_count=2, agent_options=chain(0))
        assert wait_final(client, root["id"], timeout=60)["status"] == "COMPLETED"
        jobs = client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]
        tree = [j for j in jobs if j["id"] == root["id"] or j["parent_job_id"] is not None]
        depths = sorted(j["depth"] for j in tree)
        # Two root workers each delegate a chain of five levels.
        assert depths == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        assert {j["status"] for j in tree} == {"COMPLETED"}
        assert usage_allocated(client) == [0, 0, 0, 0, 0, 0]


def test_delegation_past_the_deepest_level_fails_cleanly(server: Server) -> None:
    with server.client() as client:
        deepest = submit(client, depth=5, agent_options={"duration_seconds": 0, "subtasks": ["too deep"]})
        done = wait_final(client, deepest["id"])
        assert done["status"] == "FAILED"
        (worker,) = workers_of(client, deepest["id"])
        assert any("could not delegate" in line and "422" in line for line in log_lines(client, worker["id"]))


def test_quota_contention_all_complete_and_usage_returns_to_zero(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_QUOTAS="3,2,1")
    with server.client() as client:
        jobs = [submit(client, worker_count=2, agent_options={"duration_seconds": 1.0}) for _ in range(6)]
        peak = 0
        deadline = time.monotonic() + 300  # generous: a loaded host is slow, not wrong
        while time.monotonic() < deadline:
            allocated = usage_allocated(client)[0]
            assert allocated <= 3
            running = client.get("/api/supervisor/workers", params={"status": "RUNNING"}).json()["total"]
            assert running <= 3
            peak = max(peak, running)
            if all(job_status(client, j["id"]) in FINAL for j in jobs):
                break
            time.sleep(0.05)
        assert [job_status(client, j["id"]) for j in jobs] == ["COMPLETED"] * 6
        assert peak >= 2, "contention test never saw parallel workers"
        assert usage_allocated(client) == [0, 0, 0]


def test_explicit_allocation_is_used_first_and_release_returns_only_unheld_slots(
    servers: ServerFactory,
) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        job = submit(client, agent="ticker", worker_count=2)
        wait_until(lambda: len([w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"]) == 2)
        assert usage_allocated(client)[0] == 2
        # Both slots are held by live workers: nothing to release.
        released = client.post("/api/resources/release", json={"job_id": job["id"], "depth": 0}).json()
        assert (released["job_id"], released["released"], released["still_bound"]) == (job["id"], 0, 2)
        client.post(f"/api/jobs/{job['id']}/cancel")
        wait_until(lambda: usage_allocated(client)[0] == 0, what="slots back after cancel")


def test_priority_runs_higher_first(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_QUOTAS="1,1", ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        blocker = submit(client, agent="ticker")
        wait_until(lambda: job_status(client, blocker["id"]) == "RUNNING")
        low = submit(client, agent_options={"duration_seconds": 0}, priority=1)
        high = submit(client, agent_options={"duration_seconds": 0}, priority=5)
        client.post(f"/api/jobs/{blocker['id']}/cancel")
        low_done, high_done = wait_final(client, low["id"]), wait_final(client, high["id"])
        assert high_done["started_at"] < low_done["started_at"]


def test_an_engine_claims_only_the_jobs_it_can_start_soon(servers: ServerFactory) -> None:
    """A queue longer than the quota stays unowned (for this engine's later passes, or another
    engine) instead of piling up as one engine's backlog that every pass reads again. Cancelling
    it all while the engine keeps claiming also covers a cancel that commits between a claim and
    the start of the claimed job's worker (on PostgreSQL that worker once ran on, slot held, for a
    CANCELED job): no worker outlives its job and every slot comes back."""
    from sqlalchemy import func, select

    from orchestrator.db.models import Job
    from orchestrator.engine.engine import IDLE_SLACK
    from tests.support.db import run_in_db

    server = servers.start(ORCHESTRATOR_QUOTAS="2,1", ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        jobs = [submit(client, agent="ticker") for _ in range(20)]
        wait_until(
            lambda: client.get("/api/supervisor/workers", params={"status": "RUNNING"}).json()["total"] == 2,
            what="two workers running",
        )
        time.sleep(0.5)  # passes keep running (heartbeats, log reads): the claim must stay bounded

        async def owned(session: Any) -> int:
            stmt = select(func.count()).select_from(Job).where(Job.engine_id.is_not(None))
            return int((await session.execute(stmt)).scalar_one())

        claimed = run_in_db(server, owned)
        assert 2 <= claimed <= 2 + IDLE_SLACK, claimed
        for job in jobs:
            client.post(f"/api/jobs/{job['id']}/cancel")
        assert {wait_final(client, job["id"])["status"] for job in jobs} == {"CANCELED"}
        wait_until(lambda: usage_allocated(client) == [0, 0], what="slots back")


def test_a_jobs_explicit_allocation_is_used_before_the_queue(servers: ServerFactory) -> None:
    """Job B is queued first, but job A holds the whole depth-0 pool through an explicit
    allocation: the engine starts A's workers on A's own slots, and B only once they are back."""
    profiles = agents_file(servers.root)
    api = servers.start(
        ORCHESTRATOR_ENGINE="false", ORCHESTRATOR_AGENTS_FILE=profiles, ORCHESTRATOR_QUOTAS="2"
    )
    with api.client() as client:
        queued_first = submit(client, agent_options={"duration_seconds": 0.5})
        allocated = submit(client, worker_count=2, agent_options={"duration_seconds": 0.5})
        grant = client.post(
            "/api/resources/allocate", json={"job_id": allocated["id"], "depth": 0, "worker_count": 2}
        )
        assert grant.status_code == 200 and grant.json()["granted"] == 2, grant.text
        assert usage_allocated(client)[0] == 2
        with servers.standalone_engine(api, ORCHESTRATOR_AGENTS_FILE=profiles, ORCHESTRATOR_QUOTAS="2"):
            assert wait_final(client, allocated["id"])["status"] == "COMPLETED"
            assert wait_final(client, queued_first["id"])["status"] == "COMPLETED"
        allocated_workers = workers_of(client, allocated["id"])
        (waiting_worker,) = workers_of(client, queued_first["id"])
        assert len(allocated_workers) == 2
        # Both of A's workers ran first; B started on the first slot one of them gave back.
        assert all(w["started_at"] < waiting_worker["started_at"] for w in allocated_workers)
        assert min(w["finished_at"] for w in allocated_workers) <= waiting_worker["started_at"]
        assert usage_allocated(client)[0] == 0
