"""Nodes that come and go around a worker's life, beyond a node killed mid-run
(test_ray_node_failures.py): a node that dies while its worker is still starting (its worktree
being cloned), a node that joins while workers wait for an `agent_slot`, a node removed
gracefully (drained) with live workers, and a paused worker whose node dies.

The tests share a cluster of their own whose head has no `agent_slot`: each test adds the nodes
it needs (so it knows where its workers land) and removes them, every process they had gone."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_engine_lifecycle import log_lines, submit, usage_allocated, wait_final, workers_of
from tests.integration.test_sqlite_disk_full import fill, small_tmpfs
from tests.ray.conftest import RayCluster, current, node_id
from tests.ray.test_ray_executor import (
    LONG,
    grandchildren,
    group_states,
    mark,
    running,
    start_server,
    started_once,
)
from tests.ray.test_ray_repository import start as start_repository_server
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

# Put first on the PATH of one node (its processes inherit the raylet's environment): the node's
# `git fetch` of the worker's base (its clone, at the start) waits until the test releases it,
# then fails; every other git call is the real git's.
HOLD_FETCH = """#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = fetch ]; then
    touch "{dir}/fetching"
    while [ ! -e "{dir}/release" ]; do sleep 0.1; done
    exit 1
  fi
done
exec {git} "$@"
"""


@contextlib.contextmanager
def path_first(directory: Path) -> Iterator[None]:
    """`directory` first on this process's PATH, for the processes started meanwhile."""
    before = os.environ["PATH"]
    os.environ["PATH"] = f"{directory}:{before}"
    try:
        yield
    finally:
        os.environ["PATH"] = before


def test_a_node_that_dies_during_a_workers_start_fails_it_lost(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """The node dies while it clones the worker's worktree (before the worker runs): the worker
    ends FAILED `lost: node <id> died`, as a worker lost mid-run would, not `could not start`
    (nothing wrong with the worker or its set-up), its slot back; a worker on another node runs
    on undisturbed."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "git").write_text(HOLD_FETCH.format(dir=tmp_path, git=shutil.which("git")))
    (shim / "git").chmod(0o755)
    other = cluster.add_node(slots=1)
    node: Any = None
    server, repo, _ = start_repository_server(servers, cluster)
    processes: set[int] = set()
    try:
        with server.client() as client:
            # A sleeper on the only node first; then the node whose clones hold joins.
            sleeper = submit(client, agent="sleeper", repository=str(repo))
            (running_one,) = wait_until(
                lambda: running(client, [sleeper["id"]]), timeout=LONG, what="running"
            )
            assert running_one["host"] == node_id(other)
            with path_first(shim):
                node = cluster.add_node(slots=1)
            job = submit(client, agent="writer", repository=str(repo))
            wait_until(lambda: (tmp_path / "fetching").exists(), timeout=LONG, what="the node cloning")
            (worker,) = workers_of(client, job["id"])
            assert worker["status"] == "IDLE", worker
            processes = cluster.kill_raylet(node, signal.SIGKILL)
            wait_final(client, job["id"], timeout=LONG)
            (worker,) = workers_of(client, job["id"])
            assert worker["status"] == "FAILED", worker
            assert worker["status_reason"] == f"lost: node {node_id(node)} died", worker
            wait_until(lambda: usage_allocated(client)[0] == 1, timeout=LONG, what="its slot freed")
            assert current(client, running_one)["status"] == "RUNNING"
            assert client.post(f"/api/supervisor/workers/{running_one['id']}/terminate").status_code == 200
            wait_final(client, sleeper["id"], timeout=LONG)
            assert workers_of(client, sleeper["id"])[0]["status"] == "TERMINATED"
            assert usage_allocated(client)[0] == 0
    finally:
        (tmp_path / "release").touch()
        if node is not None:
            cluster.finish_node(node, processes or cluster.node_processes(node))
        cluster.finish_node(other, cluster.node_processes(other))


# As HOLD_FETCH, but once released the fetch goes on (the real git's): the start completes.
HOLD_FETCH_THEN_GO = HOLD_FETCH.replace("    exit 1\n", "    break\n")


def test_a_start_its_engine_died_in_then_cancelled_runs_nothing_once_an_engine_is_back(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """The engine dies (kill -9) while a worker's node clones its worktree, before the start is
    recorded; the job is cancelled meanwhile through an API with no engine; then the clone goes
    on and the node starts the agent, for nobody. The next engine takes the cancelled job over
    and kills that actor by name, and the agent with it: nothing runs on, the slot comes back."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "git").write_text(HOLD_FETCH_THEN_GO.format(dir=tmp_path, git=shutil.which("git")))
    (shim / "git").chmod(0o755)
    with path_first(shim):
        node = cluster.add_node(slots=1)
    task = f"{900 + int(mark())}.5"
    extra = f'[agents.lingerer]\ntype = "command"\ncommand = ["sleep", "{task}"]\n'
    first, repo, _ = start_repository_server(servers, cluster, extra=extra)
    env = {k: v for k, v in first.env.items() if k.startswith(("ORCHESTRATOR_", "RAY_"))}
    env.pop("ORCHESTRATOR_PUBLIC_URL", None)
    try:
        with first.client() as client:
            job = submit(client, agent="lingerer", repository=str(repo))
            wait_until(lambda: (tmp_path / "fetching").exists(), timeout=LONG, what="the node cloning")
        first.kill9()
        api = servers.make(port=first.port, **{**env, "ORCHESTRATOR_ENGINE": "false"}).start()
        with api.client() as client:
            assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
        api.kill9()
        (tmp_path / "release").touch()
        wait_until(lambda: grandchildren(task), timeout=LONG, what="the agent started for nobody")
        second = servers.make(port=first.port, **env).start()
        with second.client() as client:
            wait_until(lambda: not grandchildren(task), timeout=LONG, what="the agent killed")
            wait_until(lambda: usage_allocated(client)[0] == 0, timeout=LONG, what="its slot back")
            (worker,) = workers_of(client, job["id"])
            assert worker["status"] == "TERMINATED", worker
            assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "CANCELED"
    finally:
        (tmp_path / "release").touch()
        cluster.finish_node(node, cluster.node_processes(node))


@contextlib.contextmanager
def home(directory: Path) -> Iterator[None]:
    """`directory` as this process's HOME, for the processes started meanwhile."""
    before = os.environ["HOME"]
    os.environ["HOME"] = str(directory)
    try:
        yield
    finally:
        os.environ["HOME"] = before


def test_a_git_remote_the_node_cannot_reach_fails_the_start_naming_node_and_remote(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """The server reaches the git remote but the node does not (its git config sends the
    remote's address elsewhere, as a node outside the remote's network would): the worker ends
    FAILED with a reason naming the node, the remote and git's own words; its slot comes back."""
    server, repo, bare = start_repository_server(servers, cluster)
    (tmp_path / ".gitconfig").write_text(f'[url "{tmp_path}/unreachable.git"]\n\tinsteadOf = {bare}\n')
    with home(tmp_path):
        node = cluster.add_node(slots=1)
    try:
        with server.client() as client:
            job = submit(client, agent="writer", repository=str(repo))
            wait_final(client, job["id"], timeout=LONG)
            (worker,) = workers_of(client, job["id"])
            assert worker["status"] == "FAILED", worker
            reason = worker["status_reason"]
            assert reason.startswith(
                f"could not start: on Ray node {node_id(node)}: cannot fetch base commit"
            ), reason
            assert f"(git remote {bare})" in reason and "unreachable.git" in reason, reason
            assert usage_allocated(client)[0] == 0
    finally:
        cluster.finish_node(node, cluster.node_processes(node))


def node_with_its_dir(cluster: RayCluster, directory: Path) -> Any:
    """A node (one slot) whose node directory (ORCHESTRATOR_NODE_DIR, read at its start) is
    `directory`; the nodes after it keep the cluster's."""
    before = os.environ["ORCHESTRATOR_NODE_DIR"]
    os.environ["ORCHESTRATOR_NODE_DIR"] = str(directory)
    try:
        return cluster.add_node(slots=1)
    finally:
        os.environ["ORCHESTRATOR_NODE_DIR"] = before


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_node_whose_disk_is_full_fails_the_start_saying_so(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """The node's directory (ORCHESTRATOR_NODE_DIR) is on a full disk when it clones the
    worker's worktree: the worker ends FAILED with a reason naming the node and the full disk,
    its slot back, and the next worker, on a node with room, runs."""
    server, repo, _ = start_repository_server(servers, cluster)
    with small_tmpfs(tmp_path / "node-dir", size="1m") as mount:
        fill(mount)
        node = node_with_its_dir(cluster, mount)
        try:
            with server.client() as client:
                job = submit(client, agent="writer", repository=str(repo))
                wait_final(client, job["id"], timeout=LONG)
                (worker,) = workers_of(client, job["id"])
                assert worker["status"] == "FAILED", worker
                reason = worker["status_reason"]
                where = f"could not start: on Ray node {node_id(node)}: no space left on device in {mount}/"
                assert reason.startswith(where), reason
                assert usage_allocated(client)[0] == 0
        finally:
            cluster.finish_node(node, cluster.node_processes(node))


FILLER = """
[agents.filler]
type = "command"
command = ["sh", "-c", "echo line 1; echo line 2; echo line 3; echo work > work.txt; dd if=/dev/zero of=big.bin bs=1M count=64 2>/dev/null; echo line 4; exit 0"]
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_node_whose_disk_fills_up_mid_run_fails_the_worker_saying_so(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """The worker fills its node's disk (ORCHESTRATOR_NODE_DIR) while it runs: what it wrote
    after cannot reach its output log, nor its work the commit. It ends FAILED naming the node
    and the full disk (not COMPLETED because the agent exited 0), the lines it wrote before are
    all there, its slot comes back, and the server serves on."""
    server, repo, _ = start_repository_server(servers, cluster, extra=FILLER)
    with small_tmpfs(tmp_path / "node-dir", size="16m") as mount:
        node = node_with_its_dir(cluster, mount)
        try:
            with server.client() as client:
                job = submit(client, agent="filler", repository=str(repo))
                wait_final(client, job["id"], timeout=LONG)
                (worker,) = workers_of(client, job["id"])
                assert worker["host"] == node_id(node) and worker["status"] == "FAILED", worker
                where = f"{mount}/{node_id(node)}"
                assert (
                    worker["status_reason"] == f"no space left on device in {where} on node {node_id(node)}"
                )
                assert log_lines(client, worker["id"])[:3] == ["line 1", "line 2", "line 3"]
                assert usage_allocated(client)[0] == 0
                assert client.get("/api/jobs").status_code == 200
        finally:
            cluster.finish_node(node, cluster.node_processes(node))


def waiting_for_a_slot(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    found = workers_of(client, job_id)
    reason = (found[0]["status_reason"] or "") if len(found) == 1 else ""
    if (
        len(found) == 1
        and found[0]["status"] == "IDLE"
        and reason.startswith("waiting for a Ray node with a free agent_slot")
    ):
        return found[0]
    return None


def test_a_node_that_joins_starts_the_workers_waiting_for_a_slot(
    servers: ServerFactory, cluster: RayCluster
) -> None:
    """Scaling up: one node of one slot, two workers; the second waits IDLE for a slot until a
    node joins, then starts on it (nothing else has to happen: no slot frees meanwhile)."""
    first = cluster.add_node(slots=1)
    joined: Any = None
    server = start_server(servers, cluster)
    try:
        with server.client() as client:
            one = submit(client, agent="ticker", task_description=mark())
            (running_one,) = wait_until(lambda: running(client, [one["id"]]), timeout=LONG, what="running")
            assert running_one["host"] == node_id(first)
            two = submit(client, agent="ticker", task_description=mark())
            wait_until(lambda: waiting_for_a_slot(client, two["id"]), timeout=LONG, what="waiting IDLE")
            assert usage_allocated(client)[0] == 1
            joined = cluster.add_node(slots=1)
            (running_two,) = wait_until(lambda: running(client, [two["id"]]), timeout=LONG, what="started")
            assert running_two["host"] == node_id(joined)
            assert current(client, running_one)["status"] == "RUNNING"
            for worker in (running_one, running_two):
                wait_until(lambda w=worker: len(log_lines(client, w["id"])) >= 2, timeout=LONG, what="ticks")
                assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
            for job in (one, two):
                wait_final(client, job["id"], timeout=LONG)
                started_once(client, job["id"])
            assert usage_allocated(client)[0] == 0
    finally:
        for node in (first, joined):
            if node is not None:
                cluster.finish_node(node, cluster.node_processes(node))


def test_a_node_removed_gracefully_fails_its_workers_and_leaves_nothing_running(
    servers: ServerFactory, cluster: RayCluster
) -> None:
    """A node taken out of the cluster in order (its raylet told to stop: a scale-down, a node
    drained for maintenance) with two live workers: each ends FAILED `lost: node <id> died` with
    its slot back, its whole process tree gone; none starts again."""
    node = cluster.add_node(slots=2)
    server = start_server(servers, cluster)
    tasks = [mark(), mark()]
    processes: set[int] = set()
    try:
        with server.client() as client:
            jobs = [submit(client, agent="ticker", task_description=task) for task in tasks]
            workers = wait_until(
                lambda: running(client, [j["id"] for j in jobs]), timeout=LONG, what="running"
            )
            for worker in workers:
                wait_until(lambda w=worker: len(log_lines(client, w["id"])) >= 2, timeout=LONG, what="ticks")
            processes = cluster.node_processes(node)
            cluster.cluster.remove_node(node, allow_graceful=True)
            for job, worker in zip(jobs, workers, strict=True):
                wait_final(client, job["id"], timeout=LONG)
                final = current(client, worker)
                assert final["status"] == "FAILED", final
                assert final["status_reason"] == f"lost: node {node_id(node)} died", final
                started_once(client, job["id"])
            for task, worker in zip(tasks, workers, strict=True):
                wait_until(lambda t=task: not grandchildren(t), timeout=LONG, what="its grandchild gone")
                wait_until(lambda w=worker: not group_states(w["pid"]), timeout=LONG, what="its group gone")
            assert usage_allocated(client)[0] == 0
    finally:
        cluster.finish_node(node, processes or cluster.node_processes(node))


def test_a_paused_worker_whose_node_dies_ends_lost_and_controls_sent_meanwhile_answer(
    servers: ServerFactory, cluster: RayCluster
) -> None:
    """Two workers on a node, one paused (its group stopped); the node's raylet is killed and, at
    once, the paused one is resumed and the other terminated while Ray has not declared the node
    dead yet: each call answers (accepted, or refused with a reason: never a server error), the
    paused worker ends FAILED `lost: node <id> died`, the other lost or terminated, every process
    of theirs gone (the stopped ones too), their slots back; later calls are refused clearly."""
    node = cluster.add_node(slots=2)
    server = start_server(servers, cluster)
    tasks = [mark(), mark()]
    processes: set[int] = set()
    try:
        with server.client() as client:
            jobs = [submit(client, agent="ticker", task_description=task) for task in tasks]
            paused, other = wait_until(
                lambda: running(client, [j["id"] for j in jobs]), timeout=LONG, what="running"
            )
            assert client.post(f"/api/supervisor/workers/{paused['id']}/pause").status_code == 200
            wait_until(lambda: current(client, paused)["status"] == "PAUSED", timeout=LONG, what="PAUSED")
            wait_until(lambda: "T" in group_states(paused["pid"]), timeout=LONG, what="its group stopped")
            processes = cluster.kill_raylet(node, signal.SIGKILL)
            calls = [
                client.post(f"/api/supervisor/workers/{paused['id']}/resume"),
                client.post(f"/api/supervisor/workers/{other['id']}/terminate"),
            ]
            for call in calls:
                assert call.status_code in (200, 400, 409), (call.status_code, call.text)
                assert call.status_code == 200 or call.json()["detail"], call.text
            for job in jobs:
                wait_final(client, job["id"], timeout=LONG)
            final = current(client, paused)
            assert final["status"] == "FAILED", final
            assert final["status_reason"] == f"lost: node {node_id(node)} died", final
            ended = current(client, other)
            assert ended["status"] == "TERMINATED" or (
                ended["status"] == "FAILED" and ended["status_reason"] == f"lost: node {node_id(node)} died"
            ), ended
            for task, worker in zip(tasks, (paused, other), strict=True):
                wait_until(lambda t=task: not grandchildren(t), timeout=LONG, what="its grandchild gone")
                wait_until(lambda w=worker: not group_states(w["pid"]), timeout=LONG, what="its group gone")
            assert usage_allocated(client)[0] == 0
            for action in ("pause", "resume", "terminate"):
                refused = client.post(f"/api/supervisor/workers/{paused['id']}/{action}")
                assert refused.status_code in (400, 409) and refused.json()["detail"], refused.text
    finally:
        cluster.finish_node(node, processes or cluster.node_processes(node))
