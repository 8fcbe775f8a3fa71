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

import pytest

from tests.integration.test_engine_lifecycle import submit, usage_allocated, wait_final, workers_of
from tests.ray.conftest import RayCluster
from tests.ray.test_ray_executor import (
    LONG,
    running,
)
from tests.ray.test_ray_node_failures import current, node_id
from tests.ray.test_ray_repository import start as start_repository_server
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    made = RayCluster(tmp_path_factory.mktemp("ray-changes"), nodes=0)
    try:
        yield made
    finally:
        made.shutdown()


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
