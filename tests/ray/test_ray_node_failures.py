"""Nodes that fail in the ways `Cluster.remove_node` does not show: a raylet killed abruptly
(kill -9), a raylet that hangs (SIGSTOP: Ray's health check declares its node dead while the
processes on it run on, and it may come back), a node that dies while no engine runs, and one
that dies while its worker's branch is being pushed.

The tests share a cluster of their own whose head has no `agent_slot`: each test adds the nodes
it needs (so it knows where its workers land) and removes them, every process they had gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from tests.integration.test_engine_lifecycle import log_lines, submit, usage_allocated, wait_final, workers_of
from tests.ray.conftest import RayCluster, current, descendants, fences, node_id, state
from tests.ray.test_ray_executor import (
    LONG,
    PROFILES,
    first_env,
    grandchildren,
    group_states,
    mark,
    running,
    start_server,
    started_once,
)
from tests.ray.test_ray_repository import DELEGATOR, delegator_server, node_path
from tests.ray.test_ray_repository import start as start_repository_server
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until


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


def test_a_worker_lost_after_its_checkpoint_says_its_work_did_not_come_back(
    servers: ServerFactory, cluster: RayCluster
) -> None:
    """A delegating worker's checkpoint reached the remote, then its node dies while it works
    on: the branch holds only the checkpoint, so the lost worker's result must say its work did
    not come back (commit_error), not report the checkpoint as its commit."""
    node = cluster.add_node(slots=2)  # the delegator and its child
    server, repo, _, _ = delegator_server(servers, cluster, DELEGATOR + "time.sleep(600)\n")
    processes: set[int] = set()
    try:
        with server.client() as client:
            job = submit(client, agent="delegator", repository=str(repo))
            (worker,) = wait_until(lambda: workers_of(client, job["id"]) or None, timeout=LONG, what="worker")
            wait_until(
                lambda: any(line.startswith("CHILD ") for line in log_lines(client, worker["id"])),
                timeout=LONG * 2,
                what="the child done, from the checkpoint",
            )
            processes = cluster.kill_raylet(node, signal.SIGKILL)
            wait_final(client, job["id"], timeout=LONG)
            (worker,) = workers_of(client, job["id"])
            assert worker["status"] == "FAILED", worker
            assert worker["status_reason"] == f"lost: node {node_id(node)} died", worker
            assert worker["commit"] is None, worker
            error = worker["result"]["commit_error"]
            assert "died before it pushed" in error and "holds only its checkpoint" in error, error
            assert usage_allocated(client)[0] == 0
    finally:
        cluster.finish_node(node, processes or cluster.node_processes(node))


# The bare remote refuses the first {times} pushes of a worker's branch (as a remote that is away
# for a moment would), then takes them; every attempt leaves a line in `attempts`.
REFUSE_HOOK = """#!/bin/sh
while read -r old new ref; do
  case "$ref" in
    refs/heads/orchestrator/*)
      echo "$new" >> "{dir}/attempts"
      if [ "$(wc -l < "{dir}/attempts")" -le {times} ]; then exit 1; fi ;;
  esac
done
exit 0
"""


def refusing_remote(bare: Path, directory: Path, times: int) -> Path:
    hook = bare / "hooks" / "pre-receive"
    hook.write_text(REFUSE_HOOK.format(dir=directory, times=times))
    hook.chmod(0o755)
    return directory / "attempts"


def test_a_final_push_the_remote_refuses_for_a_moment_is_retried(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """The remote refuses the worker's branch twice, then takes it: the node tries again (after a
    pause) and the worker's work comes back, no commit_error."""
    node = cluster.add_node()
    server, repo, bare = start_repository_server(servers, cluster)
    attempts = refusing_remote(bare, tmp_path, times=2)
    try:
        with server.client() as client:
            job = submit(client, agent="writer", repository=str(repo))
            wait_final(client, job["id"], timeout=LONG)
            (worker,) = workers_of(client, job["id"])
            assert worker["host"] == node_id(node) and worker["status"] == "COMPLETED", worker
            assert worker["commit"] is not None, worker
            assert not worker["result"] or "commit_error" not in worker["result"], worker
            assert len(attempts.read_text().splitlines()) == 3  # refused twice, then taken
            assert not node_path(cluster, worker).exists(), "pushed: the node's copy is gone"
            assert usage_allocated(client)[0] == 0
    finally:
        cluster.finish_node(node, cluster.node_processes(node))


def test_a_final_push_the_remote_keeps_refusing_is_given_up_and_the_node_keeps_the_work(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """The remote refuses every push: after a bounded number of attempts the worker ends with a
    commit_error naming its node, the remote and the attempts, and its node keeps the worktree
    (the work is not lost, only not back); the server serves the next job on that node."""
    node = cluster.add_node()
    server, repo, bare = start_repository_server(servers, cluster)
    attempts = refusing_remote(bare, tmp_path, times=1000)
    try:
        with server.client() as client:
            job = submit(client, agent="writer", repository=str(repo))
            wait_final(client, job["id"], timeout=LONG * 2)
            (worker,) = workers_of(client, job["id"])
            assert worker["host"] == node_id(node) and worker["commit"] is None, worker
            error = worker["result"]["commit_error"]
            assert error.startswith(f"on node {node_id(node)}: cannot push branch {worker['branch']}"), error
            assert "pre-receive hook declined" in error and "gave up after 5 attempts" in error, error
            assert len(attempts.read_text().splitlines()) == 5
            kept = node_path(cluster, worker)
            assert (kept / "file-0.txt").read_text() == "worker 0\n", "the node keeps the work"
            assert usage_allocated(client)[0] == 0
            after = submit(client, agent="writer", task_description="after")
            assert wait_final(client, after["id"], timeout=LONG)["status"] == "COMPLETED"
    finally:
        cluster.finish_node(node, cluster.node_processes(node))


HOG = "import time\nx = []\nwhile True:\n    x.append(bytearray(8 << 20))\n    time.sleep(0.01)\n"


def test_a_worker_over_its_memory_limit_on_a_node_fails_out_of_memory_and_the_node_serves_on(
    servers: ServerFactory, cluster: RayCluster
) -> None:
    """Regression (it held before): a worker that grows past its memory limit on a node is
    killed there by its memory cgroup and ends FAILED `out of memory`, as on one machine; a
    ticker on the same node runs on, and the node takes the next worker."""
    node = cluster.add_node()
    agents = servers.root / "agents.toml"
    hog = f'\n[agents.hog]\ntype = "command"\ncommand = ["python3", "-c", {HOG!r}]\nmemory_mb = 64\n'
    agents.write_text(PROFILES + hog.replace("'", '"'))
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=str(agents), ORCHESTRATOR_QUOTAS="6", **cluster.env())
    task = mark()
    try:
        with server.client() as client:
            ticker = submit(client, agent="ticker", task_description=task)
            (ticking,) = wait_until(lambda: running(client, [ticker["id"]]), timeout=LONG, what="running")
            job = submit(client, agent="hog")
            wait_final(client, job["id"], timeout=LONG)
            (worker,) = workers_of(client, job["id"])
            assert worker["host"] == node_id(node) == ticking["host"], (worker, ticking)
            assert worker["status"] == "FAILED", worker
            assert worker["status_reason"] == "out of memory: killed at its memory limit of 64 MiB", worker
            seen = len(log_lines(client, ticking["id"]))
            wait_until(lambda: len(log_lines(client, ticking["id"])) > seen, timeout=LONG, what="ticks")
            after = submit(client, agent="short", task_description="after")
            assert wait_final(client, after["id"], timeout=LONG)["status"] == "COMPLETED"
            assert client.post(f"/api/supervisor/workers/{ticking['id']}/terminate").status_code == 200
            wait_final(client, ticker["id"], timeout=LONG)
            wait_until(lambda: not grandchildren(task), timeout=LONG, what="the ticker's processes gone")
            assert usage_allocated(client)[0] == 0
    finally:
        cluster.finish_node(node, cluster.node_processes(node))


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_whole_node_frozen_then_back_after_it_was_declared_dead_runs_and_pushes_nothing(
    servers: ServerFactory, cluster: RayCluster, tmp_path: Path
) -> None:
    """Every process of a node stops (a VM suspended: raylet, actor, worker, fence), Ray declares
    the node dead and the worker ends FAILED `lost: node <id> died`; then the node comes back
    (SIGCONT to all). What it ran must go by itself: its worker's processes, its fence and its
    actor (the node's own Ray processes are Ray's to end), and the lost worker's branch must not
    reach the remote (the engine's calls made meanwhile may reach the actor once it runs again)."""
    node = cluster.add_node()
    server, repo, bare = start_repository_server(servers, cluster)
    processes: set[int] = set()
    try:
        with server.client() as client:
            job = submit(client, agent="sleeper", repository=str(repo))
            (worker,) = wait_until(lambda: running(client, [job["id"]]), timeout=LONG, what="running")
            assert worker["host"] == node_id(node), worker
            wait_until(lambda: log_lines(client, worker["id"]) == ["ready"], timeout=LONG, what="ready")
            raylet = cluster.raylet(node).pid
            actor = parent(worker["pid"])
            ran = {actor, *fences(raylet), worker["pid"], *descendants(worker["pid"])}
            processes = cluster.node_processes(node)
            for pid in sorted(processes, key=lambda p: p != raylet):  # the raylet first
                os.kill(pid, signal.SIGSTOP)
            final = wait_until(
                lambda: (c := current(client, worker))["status"] == "FAILED" and c, timeout=LONG, what="lost"
            )
            assert final["status_reason"] == f"lost: node {node_id(node)} died", final
            for pid in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            wait_until(lambda: not any(state(pid) for pid in ran), timeout=LONG, what="what it ran gone")
            assert not group_states(worker["pid"])
            refs = subprocess.run(
                ["git", "-C", str(bare), "for-each-ref", "refs/heads"], capture_output=True, text=True
            )
            assert refs.stdout == "", "a lost worker's branch was pushed after it was declared lost"
            assert current(client, worker)["status"] == "FAILED"
            assert usage_allocated(client)[0] == 0
    finally:
        cluster.finish_node(node, processes or cluster.node_processes(node))
