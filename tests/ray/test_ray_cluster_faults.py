"""Faults of the cluster that end no node: a head restarted as a new cluster at the same
address (no GCS fault tolerance: what KubeRay does when a head pod restarts), the engine's Ray
driver process killed, and a worker's actor that stops answering.

Ray's driver ends its whole process (SIGABRT) when a new cluster answers it with another
cluster id; the engine's driver is a process of its own (executors/ray_driver.py), so the
server lives on, connects to the new cluster, and its workers of the old one end lost. A
driver process that ends for any other reason is replaced and its workers are found again by
name. An actor that does not answer is given up on after RAY_ACTOR_SILENCE_SECONDS."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from tests.integration.test_engine_lifecycle import log_lines, submit, usage_allocated, wait_final, workers_of
from tests.ray.conftest import RayCluster, current, node_id
from tests.ray.test_ray_executor import (
    LONG,
    PROFILES,
    assert_ticks,
    grandchildren,
    mark,
    running,
    start_server,
    started_once,
)
from tests.ray.test_ray_node_changes import HOLD_FETCH_THEN_GO, path_first
from tests.ray.test_ray_repository import start as start_repository_server
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until


def test_a_head_restarted_as_a_new_cluster_leaves_the_server_up_and_new_jobs_run_there(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """Under running workers the head dies and a new one starts at its address. The server
    answers throughout; the workers end FAILED `lost: the Ray cluster at … was restarted as a
    new cluster` with their slots back and their processes gone from their node, a repository
    worker's result saying its work did not come back; /ready is ready again and a new job runs
    on the new cluster's head, once."""
    cluster = RayCluster(tmp_path, nodes=1)
    old_node = cluster.nodes[0]
    node_processes: set[int] = set()
    try:
        server, repo, _ = start_repository_server(servers, cluster, extra=PROFILES)
        task = mark()
        with server.client() as client:
            first = submit(client, agent="ticker", task_description=task)
            held = submit(client, agent="sleeper", repository=str(repo))
            worker, _ = wait_until(
                lambda: running(client, [first["id"], held["id"]]), timeout=LONG, what="workers running"
            )
            wait_until(lambda: len(log_lines(client, worker["id"])) >= 2, timeout=LONG, what="ticks")
            node_processes = cluster.node_processes(old_node)
            new_head = cluster.restart_head(slots=1)

            lost = wait_until(
                lambda: (w := workers_of(client, first["id"])[0])["status"] == "FAILED" and w,
                timeout=LONG,
                what="the old cluster's worker ended",
            )
            reason = f"lost: the Ray cluster at {cluster.address} was restarted as a new cluster"
            assert lost["status_reason"] == reason, lost
            wait_final(client, held["id"], timeout=LONG)
            (repository_worker,) = workers_of(client, held["id"])
            assert repository_worker["status_reason"] == reason, repository_worker
            assert repository_worker["commit"] is None, repository_worker
            error = repository_worker["result"]["commit_error"]
            assert error == f"{reason.removeprefix('lost: ')} before it pushed the worker's branch", error
            assert server.process is not None and server.process.poll() is None, server.log()
            assert client.get("/health").status_code == 200
            wait_until(lambda: client.get("/ready").status_code == 200, timeout=LONG, what="/ready again")
            assert client.get("/ready").json()["cluster"]["status"] == "connected"

            second = submit(client, agent="short", task_description=mark())
            assert wait_final(client, second["id"], timeout=LONG)["status"] == "COMPLETED"
            (ran,) = workers_of(client, second["id"])
            assert ran["host"] == node_id(new_head), (ran, node_id(new_head))
            assert usage_allocated(client)[0] == 0
            wait_until(lambda: not grandchildren(task), timeout=LONG, what="the old worker's processes gone")
            assert server.process.poll() is None, server.log()
    finally:
        cluster.shutdown()
        cluster.finish_node(old_node, node_processes)


def test_a_head_restarted_as_a_new_cluster_during_a_start_starts_the_worker_once_on_the_new_one(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """The head is restarted as a new cluster while a worker's node clones its worktree (the
    start not yet answered). The start is asked again through the server's new driver and the
    worker runs on the new cluster's head, once: the old node's clone is let go on, but that
    node ends with its cluster, so its start runs nothing. Terminated, nothing is left."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "git").write_text(HOLD_FETCH_THEN_GO.format(dir=tmp_path, git=shutil.which("git")))
    (shim / "git").chmod(0o755)
    with path_first(shim):  # the old cluster's nodes only
        cluster = RayCluster(tmp_path, nodes=1)
    old_node = cluster.nodes[0]
    node_processes: set[int] = set()
    task = f"{900 + int(mark())}.5"
    extra = f'[agents.lingerer]\ntype = "command"\ncommand = ["sleep", "{task}"]\n'
    try:
        server, repo, _ = start_repository_server(servers, cluster, extra=extra)
        with server.client() as client:
            job = submit(client, agent="lingerer", repository=str(repo))
            wait_until(lambda: (tmp_path / "fetching").exists(), timeout=LONG, what="the old node cloning")
            node_processes = cluster.node_processes(old_node)
            new_head = cluster.restart_head(slots=1)
            (tmp_path / "release").touch()  # the old node's clone goes on, while its node lives
            (worker,) = wait_until(lambda: running(client, [job["id"]]), timeout=LONG, what="worker running")
            assert worker["host"] == node_id(new_head), (worker, node_id(new_head))
            wait_until(
                lambda: not any(map(alive, node_processes)),
                timeout=LONG,
                what="the old node's processes ended with its cluster",
            )
            assert len(grandchildren(task)) == 1, "the worker was started twice"
            started_once(client, job["id"])
            assert server.process is not None and server.process.poll() is None, server.log()

            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
            wait_final(client, job["id"], timeout=LONG)
            wait_until(lambda: not grandchildren(task), timeout=LONG, what="its processes gone")
            assert usage_allocated(client)[0] == 0
    finally:
        (tmp_path / "release").touch()
        cluster.shutdown()
        cluster.finish_node(old_node, node_processes)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: a raylet's parent is the test, which reaps it late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def driver_processes(server_pid: int) -> list[int]:
    """The server's Ray driver processes (its children running executors/ray_driver_child.py)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"orchestrator.executors.ray_driver_child" in argv:
            found.append(int(name))
    return found


def test_a_driver_process_killed_is_replaced_and_its_workers_run_on(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """kill -9 of the server's Ray driver process (as Ray's own abort ends it) while a worker
    runs: the server starts another driver, finds the worker's actor again by name, and the
    worker runs on, not started again, each tick once; new jobs start; terminate works."""
    server = start_server(servers, ray_cluster)
    assert server.process is not None
    task = mark()
    with server.client() as client:
        job = submit(client, agent="ticker", task_description=task)
        (worker,) = wait_until(lambda: running(client, [job["id"]]), timeout=LONG, what="worker running")
        wait_until(lambda: len(log_lines(client, worker["id"])) >= 2, timeout=LONG, what="ticks")
        (driver,) = wait_until(lambda: driver_processes(server.process.pid), timeout=LONG, what="driver")
        os.kill(driver, signal.SIGKILL)
        wait_until(
            lambda: (found := driver_processes(server.process.pid)) and driver not in found,
            timeout=LONG,
            what="another driver process",
        )
        seen = len(log_lines(client, worker["id"]))
        wait_until(lambda: len(log_lines(client, worker["id"])) > seen + 2, timeout=LONG, what="ticks on")
        again = current(client, worker)
        assert again["status"] == "RUNNING" and again["pid"] == worker["pid"], again
        assert len(grandchildren(task)) == 1, "the worker was started twice"
        second = submit(client, agent="short", task_description=mark())
        assert wait_final(client, second["id"], timeout=LONG)["status"] == "COMPLETED"

        assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        wait_final(client, job["id"], timeout=LONG)
        assert_ticks(log_lines(client, worker["id"]))
        wait_until(lambda: not grandchildren(task), timeout=LONG, what="its processes gone")
        assert usage_allocated(client)[0] == 0
        assert len(driver_processes(server.process.pid)) == 1


def actor_process(worker_pid: int) -> int:
    """The Ray worker process that hosts a worker's actor: the parent of its wrapper."""
    ppid = int(Path(f"/proc/{worker_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert b"ray::" in Path(f"/proc/{ppid}/cmdline").read_bytes(), "not an actor's process"
    return ppid


def test_an_actor_that_stops_answering_ends_its_worker_lost_and_nobody_elses(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """A worker's actor process is stopped (SIGSTOP: alive to Ray and to its node, deaf to the
    engine) beside another running worker. After RAY_ACTOR_SILENCE_SECONDS its worker ends
    FAILED `lost: its Ray actor did not answer for <n> s`: the actor is killed and the fence takes
    its processes along, its slot comes back. The other worker runs on, each tick once, and
    ends as asked."""
    server = start_server(servers, ray_cluster, RAY_ACTOR_SILENCE_SECONDS="10")
    silent_task, other_task = mark(), mark()
    actor = 0
    with server.client() as client:
        silent = submit(client, agent="ticker", task_description=silent_task)
        other = submit(client, agent="ticker", task_description=other_task)
        silent_worker, other_worker = wait_until(
            lambda: running(client, [silent["id"], other["id"]]), timeout=LONG, what="both running"
        )
        wait_until(lambda: len(log_lines(client, silent_worker["id"])) >= 2, timeout=LONG, what="ticks")
        actor = actor_process(silent_worker["pid"])
        os.kill(actor, signal.SIGSTOP)
        try:
            lost = wait_until(
                lambda: (w := current(client, silent_worker))["status"] == "FAILED" and w,
                timeout=LONG,
                what="the silent actor's worker ended",
            )
            assert lost["status_reason"].startswith("lost: its Ray actor did not answer for "), lost
            wait_until(lambda: not grandchildren(silent_task), timeout=LONG, what="its processes gone")
            wait_until(lambda: not Path(f"/proc/{actor}").exists(), timeout=LONG, what="its actor gone")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(actor, signal.SIGCONT)
        assert_ticks(log_lines(client, silent_worker["id"]))

        assert current(client, other_worker)["status"] == "RUNNING"
        seen = len(log_lines(client, other_worker["id"]))
        wait_until(lambda: len(log_lines(client, other_worker["id"])) > seen + 2, timeout=LONG, what="ticks")
        assert client.post(f"/api/supervisor/workers/{other_worker['id']}/terminate").status_code == 200
        wait_final(client, other["id"], timeout=LONG)
        assert current(client, other_worker)["status"] == "TERMINATED"
        assert_ticks(log_lines(client, other_worker["id"]))
        wait_until(lambda: not grandchildren(other_task), timeout=LONG, what="its processes gone")
        assert usage_allocated(client)[0] == 0
