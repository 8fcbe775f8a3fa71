"""Nodes that fail in the ways `Cluster.remove_node` does not show: a raylet killed abruptly
(kill -9), a raylet that hangs (SIGSTOP: Ray's health check declares its node dead while the
processes on it run on, and it may come back), a node that dies while no engine runs, and one
that dies while its worker's branch is being pushed.

The tests share a cluster of their own whose head has no `agent_slot`: each test adds the nodes
it needs (so it knows where its workers land) and removes them, every process they had gone."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_engine_lifecycle import log_lines, submit, usage_allocated, wait_final, workers_of
from tests.ray.conftest import RayCluster
from tests.ray.test_ray_executor import (
    LONG,
    first_env,
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    made = RayCluster(tmp_path_factory.mktemp("ray-failures"), nodes=0)
    try:
        yield made
    finally:
        made.shutdown()


def node_id(node: Any) -> str:
    return str(node.node_id)


def fences(raylet: int) -> list[int]:
    """The fence processes watching workers of the node whose raylet is `raylet`."""
    found = []
    for name in Path("/proc").iterdir():
        if name.name.isdigit():
            try:
                argv = (name / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                b"orchestrator-fence" in argv
                and argv[argv.index(b"orchestrator-fence") + 2] == str(raylet).encode()
            ):
                found.append(int(name.name))
    return found


def current(client: httpx.Client, worker: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = client.get(f"/api/supervisor/workers/{worker['id']}").json()
    return found


def test_a_raylet_killed_and_a_raylet_hung_fail_their_workers_and_nothing_runs_on(
    servers: ServerFactory, cluster: RayCluster
) -> None:
    """Three nodes, two tickers on each: one node's raylet gets kill -9, one's SIGSTOP (its
    processes run on, its actors still answer, until Ray's health check declares the node dead),
    the third lives. The first two's workers end FAILED `lost: node <id> died` with their slots
    back and every process of theirs gone; the hung raylet then resumes, and none is started
    again; the third node's workers run on undisturbed."""
    killed, hung, alive = cluster.add_node(), cluster.add_node(), cluster.add_node()
    server = start_server(servers, cluster)
    tasks = [mark() for _ in range(6)]
    with server.client() as client:
        jobs = [submit(client, agent="ticker", task_description=task) for task in tasks]
        workers = wait_until(
            lambda: running(client, [j["id"] for j in jobs]), timeout=LONG * 2, what="running"
        )
        task_of = {w["id"]: tasks[[j["id"] for j in jobs].index(w["job_id"])] for w in workers}
        on = {n: [w for w in workers if w["host"] == node_id(n)] for n in (killed, hung, alive)}
        assert [len(found) for found in on.values()] == [2, 2, 2], [w["host"] for w in workers]
        for worker in workers:
            wait_until(lambda w=worker: len(log_lines(client, w["id"])) >= 2, timeout=LONG, what="ticks")
        hung_raylet = cluster.raylet(hung).pid
        assert len(fences(hung_raylet)) == 2
        killed_processes = cluster.kill_raylet(killed, signal.SIGKILL)
        hung_processes = cluster.kill_raylet(hung, signal.SIGSTOP)
        try:
            for node in (killed, hung):
                for worker in on[node]:
                    final = wait_until(
                        lambda w=worker: (c := current(client, w))["status"] == "FAILED" and c,
                        timeout=LONG,
                        what=f"worker {worker['id']} on a failed node FAILED",
                    )
                    assert final["status_reason"] == f"lost: node {node_id(node)} died", final
                    # Its whole process tree is gone, the hung node's too (its raylet still stopped).
                    wait_until(
                        lambda w=worker: not grandchildren(task_of[w["id"]]), timeout=LONG, what="gone"
                    )
                    wait_until(lambda w=worker: not group_states(w["pid"]), timeout=LONG, what="group gone")
            wait_until(lambda: usage_allocated(client)[0] == 2, timeout=LONG, what="the lost slots freed")
            assert cluster.raylet(hung).poll() is None, "the hung raylet is still there, stopped"
        finally:
            cluster.finish_node(killed, killed_processes)
            hung_left = cluster.finish_node(hung, hung_processes)  # SIGCONT first: it comes back
        assert not any(pid in hung_left for pid in fences(hung_raylet)), "a fence outlived its node"
        for worker in on[killed] + on[hung]:
            assert current(client, worker)["status"] == "FAILED"
            assert not grandchildren(task_of[worker["id"]]), "a lost worker started again"
        for worker in on[alive]:
            assert current(client, worker)["status"] == "RUNNING"
            seen = len(log_lines(client, worker["id"]))
            wait_until(
                lambda w=worker, s=seen: len(log_lines(client, w["id"])) > s, timeout=LONG, what="ticks"
            )
            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        for job in jobs:
            wait_final(client, job["id"], timeout=LONG)
            started_once(client, job["id"])
        assert usage_allocated(client)[0] == 0
    cluster.finish_node(alive, cluster.node_processes(alive))


def test_a_node_that_dies_while_no_engine_runs_is_named_at_the_take_over(
    servers: ServerFactory, cluster: RayCluster
) -> None:
    node = cluster.add_node()
    first = start_server(servers, cluster)
    task = mark()
    with first.client() as client:
        job = submit(client, agent="ticker", task_description=task)
        (worker,) = wait_until(lambda: running(client, [job["id"]]), timeout=LONG, what="running")
        assert worker["host"] == node_id(node)
    first.kill9()
    processes = cluster.kill_raylet(node, signal.SIGKILL)
    try:
        second = servers.make(port=first.port, **first_env(first)).start()
        with second.client() as client:
            final = wait_final(client, job["id"], timeout=LONG)
            found = workers_of(client, job["id"])[0]
            assert (
                found["status"] == "FAILED" and found["status_reason"] == f"lost: node {node_id(node)} died"
            ), (
                final,
                found,
            )
            wait_until(lambda: not grandchildren(task), timeout=LONG, what="its processes gone")
            assert usage_allocated(client)[0] == 0
    finally:
        cluster.finish_node(node, processes)


# The bare remote takes the base the server publishes, and holds the push of a worker's branch
# (from its node) until the test releases it, so the node can be killed mid-push; then refuses it.
HOLD_HOOK = """#!/bin/sh
while read -r old new ref; do
  case "$ref" in
    refs/heads/orchestrator/*)
      touch "{dir}/pushing"
      while [ ! -e "{dir}/release" ]; do sleep 0.1; done
      exit 1 ;;
  esac
done
exit 0
"""


def test_a_node_that_dies_while_pushing_a_branch_fails_the_worker_lost(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """The worker ended well, but its node died before its branch reached the remote: its work
    is lost with the node, so it ends FAILED `lost: node <id> died`, saying why its commit is
    missing, not COMPLETED with nothing."""
    node = cluster.add_node()
    server, repo, bare = start_repository_server(servers, cluster)
    hook = bare / "hooks" / "pre-receive"
    hook.write_text(HOLD_HOOK.format(dir=tmp_path))
    hook.chmod(0o755)
    processes: set[int] = set()
    try:
        with server.client() as client:
            job = submit(client, agent="writer", repository=str(repo))
            wait_until(lambda: (tmp_path / "pushing").exists(), timeout=LONG, what="the branch being pushed")
            (worker,) = workers_of(client, job["id"])
            assert worker["host"] == node_id(node) and worker["status"] == "RUNNING", worker
            processes = cluster.kill_raylet(node, signal.SIGKILL)
            wait_final(client, job["id"], timeout=LONG)
            (worker,) = workers_of(client, job["id"])
            assert worker["status"] == "FAILED", worker
            assert worker["status_reason"] == f"lost: node {node_id(node)} died", worker
            assert worker["commit"] is None and "died before it pushed" in worker["result"]["commit_error"], (
                worker
            )
    finally:
        (tmp_path / "release").touch()
        cluster.finish_node(node, processes or cluster.node_processes(node))
    refs = subprocess.run(
        ["git", "-C", str(bare), "for-each-ref", "refs/heads"], capture_output=True, text=True
    )
    assert refs.stdout == "", refs.stdout
