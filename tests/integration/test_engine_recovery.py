"""Crash safety and many processes: kill -9 of the server, lost workers, several engines."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.integration.test_engine_lifecycle import (
    agents_file,
    job_status,
    log_lines,
    pid_alive,
    submit,
    usage_allocated,
    wait_final,
    workers_of,
)
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until


def leave_behind_dead_engine(
    server: Server, job_id: str, *, engine_id: str, host: str, pid: int, **job_values: Any
) -> None:
    """Write the state an engine that died owning `job_id` left: its record, stale for a minute,
    its claim on the job (plus `job_values`), and the one slot the job's worker holds."""
    from datetime import timedelta

    from sqlalchemy import update as sql_update

    from orchestrator.db.models import Allocation, EngineRecord, Job, ResourcePool, utcnow
    from tests.support.db import run_in_db

    stale = utcnow() - timedelta(seconds=60)

    async def left_behind(session: Any) -> None:
        session.add(EngineRecord(id=engine_id, host=host, pid=pid, started_at=stale, heartbeat_at=stale))
        await session.execute(
            sql_update(Job).where(Job.id == job_id).values(engine_id=engine_id, **job_values)
        )
        await session.execute(
            sql_update(Allocation).where(Allocation.job_id == job_id).values(slots=1, bound=1)
        )
        await session.execute(
            sql_update(ResourcePool)
            .where(ResourcePool.depth == 0)
            .values(allocated=ResourcePool.allocated + 1)
        )

    run_in_db(server, left_behind)


def test_kill9_server_workers_survive_and_are_readopted(servers: ServerFactory) -> None:
    first = servers.start()
    with first.client() as client:
        short = submit(client, worker_count=2, agent_options={"duration_seconds": 1.0})
        long = submit(client, worker_count=2, agent_options={"duration_seconds": 6.0})

        def four_running() -> bool:
            workers = workers_of(client, short["id"]) + workers_of(client, long["id"])
            return len(workers) == 4 and all(w["status"] == "RUNNING" for w in workers)

        wait_until(four_running, timeout=20, what="four workers running")
        long_pids = [w["pid"] for w in workers_of(client, long["id"])]

    first.kill9()
    assert all(pid_alive(p) for p in long_pids), "workers must outlive the server"
    time.sleep(2.0)  # the short workers end while no engine is watching

    second = servers.make(port=first.port).start()
    with second.client() as client:
        for job in (short, long):
            done = wait_final(client, job["id"], timeout=30)
            assert done["status"] == "COMPLETED", done
        for job in (short, long):
            for worker in workers_of(client, job["id"]):
                assert worker["status"] == "COMPLETED" and worker["exit_code"] == 0
                lines = log_lines(client, worker["id"])
                assert lines[-1] == "[simulated] done with exit code 0"
                steps = [line for line in lines if "working... step" in line]
                numbers = [int(line.split("step ")[1].split()[0]) for line in steps]
                assert numbers == list(range(1, len(numbers) + 1)), "log lines lost or duplicated"
        events = client.get(f"/api/jobs/{long['id']}/events").json()["events"]
        actors = {e["actor"] for e in events if e["kind"] == "job.status" and e["to_status"] == "COMPLETED"}
        assert len(actors) == 1 and next(iter(actors)).startswith("engine:")
        assert usage_allocated(client) == [0, 0, 0, 0, 0, 0]


def test_workers_killed_while_server_down_are_marked_lost(servers: ServerFactory) -> None:
    first = servers.start(ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with first.client() as client:
        job = submit(client, agent="ticker", worker_count=2)
        wait_until(lambda: len([w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"]) == 2)
        pids = [w["pid"] for w in workers_of(client, job["id"])]
    first.kill9()
    for pid in pids:
        os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in pids))

    second = servers.make(port=first.port).start()
    with second.client() as client:
        done = wait_final(client, job["id"], timeout=20)
        assert done["status"] == "FAILED"
        for worker in workers_of(client, job["id"]):
            assert worker["status"] == "FAILED"
            assert worker["status_reason"].startswith("lost")
        assert usage_allocated(client) == [0, 0, 0, 0, 0, 0]
        assert "tick" in log_lines(client, workers_of(client, job["id"])[0]["id"])


def test_four_processes_each_job_claimed_once_and_control_within_a_second(servers: ServerFactory) -> None:
    server = servers.start(workers=4, ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        jobs = [submit(client, worker_count=1, agent_options={"duration_seconds": 0.2}) for _ in range(12)]
        for job in jobs:
            assert wait_final(client, job["id"], timeout=30)["status"] == "COMPLETED"
            events = client.get(f"/api/jobs/{job['id']}/events").json()["events"]
            engines = {e["actor"] for e in events if e["actor"].startswith("engine:")}
            assert len(engines) == 1, f"job {job['id']} touched by several engines: {engines}"

        ticker = submit(client, agent="ticker", worker_count=2)
        wait_until(
            lambda: len([w for w in workers_of(client, ticker["id"]) if w["status"] == "RUNNING"]) == 2
        )
        for worker in workers_of(client, ticker["id"]):
            started = time.monotonic()
            assert client.post(f"/api/supervisor/workers/{worker['id']}/pause").status_code == 200
            stat = Path(f"/proc/{worker['pid']}/stat")
            wait_until(lambda s=stat: s.read_text().rsplit(")", 1)[1].split()[0] == "T", timeout=1.5)
            assert time.monotonic() - started < 1.5
        client.post(f"/api/jobs/{ticker['id']}/cancel")
        wait_until(lambda: usage_allocated(client)[0] == 0, timeout=15)
        assert job_status(client, ticker["id"]) == "CANCELED"


def test_dead_engine_on_another_host_loses_its_workers_after_the_lease(servers: ServerFactory) -> None:
    """A worker whose engine, on another host, stopped heartbeating cannot be checked from here:
    after the lease it is FAILED `lost`, its job settles, and its slot comes back."""
    from datetime import timedelta

    from orchestrator.db.models import utcnow
    from tests.support.db import seed_worker

    # The state a dead engine on host "elsewhere" left behind, written while no engine runs here.
    api_only = servers.start(ORCHESTRATOR_ENGINE="false")
    with api_only.client() as client:
        job_id = submit(client)["id"]
    leave_behind_dead_engine(
        api_only,
        job_id,
        engine_id="e_elsewhere01",
        host="elsewhere",
        pid=1,
        status="RUNNING",
        started_at=utcnow() - timedelta(seconds=60),
    )
    worker_id = seed_worker(
        api_only,
        job_id,
        host="elsewhere",
        pid=4242,
        pid_start_time=1,
        holds_slot=True,
        engine_id="e_elsewhere01",
    )
    api_only.stop()

    server = servers.make(port=api_only.port, ORCHESTRATOR_ENGINE_LEASE_SECONDS="2").start()
    with server.client() as client:
        done = wait_final(client, job_id, timeout=20)
        assert done["status"] == "FAILED"
        worker = client.get(f"/api/supervisor/workers/{worker_id}").json()
        assert worker["status"] == "FAILED" and worker["status_reason"].startswith("lost"), worker
        assert "elsewhere" in worker["status_reason"]
        wait_until(lambda: usage_allocated(client) == [0, 0, 0, 0, 0, 0], timeout=10, what="slots back")


def test_worker_started_but_not_yet_recorded_is_adopted_not_started_twice(servers: ServerFactory) -> None:
    """The engine died after starting a worker's wrapper and before writing its PID to the
    database. The wrapper wrote its PID to the run dir; the next engine adopts that process (it
    is this run dir's wrapper) instead of starting the worker a second time."""
    import socket
    import subprocess

    from orchestrator.agents.base import LaunchSpec
    from orchestrator.executors.local import LocalExecutor
    from tests.support.db import seed_worker

    api_only = servers.start(ORCHESTRATOR_ENGINE="false")
    with api_only.client() as client:
        job_id = submit(client)["id"]
    gone = subprocess.Popen(["true"])
    gone.wait()  # a PID that is certainly not a live engine
    leave_behind_dead_engine(
        api_only, job_id, engine_id="e_crashed0001", host=socket.gethostname(), pid=gone.pid
    )
    worker_id = seed_worker(api_only, job_id, status="IDLE", holds_slot=True, engine_id="e_crashed0001")
    data_dir = Path(api_only.env["ORCHESTRATOR_DATA_DIR"])
    run_dir, workdir = data_dir / "runs" / worker_id, data_dir / "workspaces" / worker_id
    workdir.mkdir(parents=True)
    wrapper = LocalExecutor().start(
        # Long enough to outlast a server start on a loaded machine (3-5 s measured here).
        worker_id,
        LaunchSpec(argv=["sh", "-c", "sleep 12; echo ran once"]),
        workdir,
        run_dir,
    )
    api_only.stop()

    server = servers.make(port=api_only.port).start()
    with server.client() as client:
        worker = wait_until(
            lambda: (w := client.get(f"/api/supervisor/workers/{worker_id}").json())["pid"] and w,
            timeout=10,
            what="worker adopted",
        )
        assert (worker["status"], worker["pid"]) == ("RUNNING", wrapper.pid), worker
        done = wait_final(client, job_id, timeout=40)
        assert done["status"] == "COMPLETED", done
        assert log_lines(client, worker_id) == ["ran once"]
        assert (run_dir / "output.log").read_text() == "ran once\n"  # one run, not two
        wait_until(lambda: usage_allocated(client) == [0, 0, 0, 0, 0, 0], timeout=10, what="slots back")
    assert wrapper.own_child
    LocalExecutor().wait(wrapper, timeout=5)
