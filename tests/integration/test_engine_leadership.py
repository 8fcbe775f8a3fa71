"""One working engine per host and database among API processes (orchestrator/api/leadership.py):
`uvicorn --workers 2` registers one engine, a kill -9 of its process hands the engine to the
standby (which adopts the running workers), and a graceful stop of a server hands it to another
server sharing the database on this host. Real processes, both databases."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from orchestrator.api.leadership import lock_path
from orchestrator.db.models import EngineRecord
from orchestrator.executors.processes import pid_alive
from tests.integration.test_engine_lifecycle import agents_file, log_lines, submit, wait_final, workers_of
from tests.support.db import run_in_db, settings_for
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

LONG = 180.0  # generous: both cores may be busy with other suites


def engine_pids(server: Server) -> list[int]:
    """The PIDs of the registered engines whose process is alive (a killed one's row stays)."""

    async def rows(session: Any) -> list[int]:
        return [r.pid for r in (await session.execute(select(EngineRecord))).scalars()]

    return sorted(pid for pid in run_in_db(server, rows) if pid_alive(pid) and not _zombie(pid))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def children(server: Server) -> list[int]:
    assert server.process is not None
    text = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text()
    return [int(pid) for pid in text.split()]


def holders_of(path: Path, pids: list[int]) -> list[int]:
    """Which of `pids` have `path` open (the engine holder and every standby waiting on it)."""
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def the_lock(server: Server) -> Path:
    return lock_path(settings_for(server).async_database_url)


def ready(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/ready", timeout=30).json()
    return body


def test_workers_2_run_one_engine_and_a_standby_takes_over_after_kill9(servers: ServerFactory) -> None:
    server = servers.start(workers=2, ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    lock = the_lock(server)
    # Both processes are up and in line for the engine (one holds the lock, one waits on it), or
    # (without leadership) each started an engine of its own.
    wait_until(
        lambda: (
            (len(holders_of(lock, children(server))) == 2 and engine_pids(server))
            or len(engine_pids(server)) > 1
        ),
        timeout=LONG,
        what="both processes up",
    )
    assert len(engine_pids(server)) == 1, "exactly one engine among the processes"
    [leader] = engine_pids(server)
    assert leader in children(server)
    states = {ready(server).get("engine") for _ in range(20)}  # new connections: either process answers
    assert states and states <= {"running", "standby"}, states

    with server.client() as client:
        quick = submit(client, worker_count=2, agent_options={"duration_seconds": 0.2})
        assert wait_final(client, quick["id"], timeout=LONG)["status"] == "COMPLETED"
        long = submit(client, worker_count=1, agent_options={"duration_seconds": 10.0})
        wait_until(
            lambda: [w["status"] for w in workers_of(client, long["id"])] == ["RUNNING"],
            timeout=LONG,
            what="the long worker running",
        )
        [worker] = workers_of(client, long["id"])
        assert engine_pids(server) == [leader], "exactly one engine, all along"

        os.kill(leader, signal.SIGKILL)
        assert pid_alive(worker["pid"]), "the worker outlives its engine"
        # The standby takes over (and uvicorn's master starts a new process in the killed one's place).
        wait_until(
            lambda: engine_pids(server) not in ([], [leader]), timeout=LONG, what="the standby's engine"
        )
        [successor] = engine_pids(server)
        assert successor != leader

        done = wait_final(client, long["id"], timeout=LONG)
        assert done["status"] == "COMPLETED", done
        [ended] = workers_of(client, long["id"])
        assert ended["id"] == worker["id"] and ended["pid"] == worker["pid"], "adopted, not started again"
        assert ended["exit_code"] == 0
        lines = log_lines(client, worker["id"])
        steps = [int(line.split("step ")[1].split()[0]) for line in lines if "working... step" in line]
        assert steps == list(range(1, len(steps) + 1)), "one run of the worker, no line lost or doubled"

        after = submit(client, worker_count=2, agent_options={"duration_seconds": 0.2})
        assert wait_final(client, after["id"], timeout=LONG)["status"] == "COMPLETED"
        wait_until(lambda: len(holders_of(lock, children(server))) == 2, timeout=LONG, what="a new standby")
        assert engine_pids(server) == [successor]


def test_two_servers_share_one_engine_and_a_graceful_stop_hands_it_over(servers: ServerFactory) -> None:
    """Two servers on this host with their own data dirs and one database: one engine between
    them; SIGTERM to the one running it, and the other's starts (not after a lease: at once)."""
    first = servers.start(ORCHESTRATOR_ENGINE_LEASE_SECONDS="600")
    wait_until(lambda: len(engine_pids(first)) == 1, timeout=LONG, what="the first server's engine")
    assert engine_pids(first) == [first.process.pid if first.process else -1]

    other_data = servers.root / "other-data"
    second = servers.start(ORCHESTRATOR_DATA_DIR=str(other_data), ORCHESTRATOR_ENGINE_LEASE_SECONDS="600")
    lock = the_lock(second)
    assert lock == the_lock(first)
    assert second.process is not None
    wait_until(
        lambda: holders_of(lock, [second.process.pid]) != [] or len(engine_pids(first)) > 1,
        timeout=LONG,
        what="the second server in line (or with an engine of its own)",
    )
    assert engine_pids(first) == [first.process.pid if first.process else -1], "one engine between them"
    assert ready(first).get("engine") == "running"
    second_ready = ready(second)
    assert second_ready["status"] == "ready" and second_ready.get("engine") == "standby", second_ready

    first.stop()
    wait_until(lambda: engine_pids(second) == [second.process.pid], timeout=LONG, what="the handover")
    assert ready(second).get("engine") == "running"
    with second.client() as client:
        job = submit(client, worker_count=2, agent_options={"duration_seconds": 0.2})
        assert wait_final(client, job["id"], timeout=LONG)["status"] == "COMPLETED"


def test_a_worker_cannot_take_the_engine_lock(servers: ServerFactory) -> None:
    """Workers are hostile: one holding the lock would keep every standby from ever taking over.
    It neither inherits the engine's descriptor nor can open the lock file (the sandbox's view)."""
    probe = servers.root / "probe-agents.toml"
    server = servers.make()
    lock = the_lock(server)
    script = (
        f"if exec 9>>'{lock}'; then flock -n 9 && echo TOOK-LOCK || echo LOCK-BUSY; else echo NO-ACCESS; fi"
    )
    probe.write_text(f'[agents.probe]\ntype = "command"\ncommand = ["bash", "-c", "{script}; sleep 30"]\n')
    server.env["ORCHESTRATOR_AGENTS_FILE"] = str(probe)
    server.start()
    with server.client() as client:
        job = submit(client, agent="probe", worker_count=1)

        def said() -> list[str]:
            workers = workers_of(client, job["id"])
            if not workers or not workers[0]["pid"]:
                return []
            return [
                line
                for line in log_lines(client, workers[0]["id"])
                if line in ("TOOK-LOCK", "LOCK-BUSY", "NO-ACCESS")
            ]

        lines = wait_until(said, timeout=LONG, what="the probe's verdict")
        assert lines == ["NO-ACCESS"], lines
        [worker] = workers_of(client, job["id"])
        assert holders_of(lock, [worker["pid"], *_descendants(worker["pid"])]) == [], "inherited descriptor"
        client.post(f"/api/jobs/{job['id']}/cancel").raise_for_status()


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                kids = [int(p) for p in task.read_text().split()]
            except OSError:
                continue
            found += kids
            pending += kids
    return found


def test_ready_says_starting_up_until_this_processs_engine_has_started(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """/health answers before the engine starts, and the engine registers (so a heartbeat
    exists) before its start is over (the network guard, recovery): until it is over, /ready
    says 503 "starting up", never ready without saying how workers are confined. A slow `nft`
    (first on PATH) holds the start in that window."""
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    nft = slow / "nft"
    nft.write_text('#!/bin/sh\nsleep 3\nexec /usr/sbin/nft "$@"\n')
    nft.chmod(0o755)
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root), PATH=f"{slow}:{os.environ['PATH']}"
    )
    seen: list[dict[str, Any]] = []

    def ready_at_last() -> dict[str, Any] | None:
        answer = httpx.get(f"{server.url}/ready", timeout=30)
        seen.append(answer.json())
        return answer.json() if answer.status_code == 200 else None

    body = wait_until(ready_at_last, what="/ready 200")
    assert body["engine"] == "running" and body["sandbox"]["network_guard"] == "on", (body, seen)
    starting = "starting up: this process's engine is starting"
    assert any(answer.get("reason") == starting for answer in seen), seen  # the window was seen
