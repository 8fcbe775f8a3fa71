"""A real multi-node Ray cluster on this machine (a head and two nodes with their own
`agent_slot` counts), every process on 127.0.0.1, shared by the Ray test group."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before Ray is imported: keep every address on loopback (Ray otherwise resolves 127.0.0.1 to the
# machine's interface address, and a driver given 127.0.0.1 waits for a GCS it never reaches).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

SLOTS_PER_NODE = 2


class RayCluster:
    def __init__(self, root: Path, nodes: int = 2) -> None:
        self.node_dir = root / "nodes"
        os.environ["ORCHESTRATOR_NODE_DIR"] = str(self.node_dir)  # the nodes inherit it
        self.cluster = ray_cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
                # A node whose raylet died is declared dead within seconds, not the default ~15 s.
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5},
            },
        )
        self.nodes = [self.add_node() for _ in range(nodes)]
        self.address: str = self.cluster.address

    def add_node(self, slots: int = SLOTS_PER_NODE) -> object:
        return self.cluster.add_node(num_cpus=1, resources={"agent_slot": slots}, node_ip_address="127.0.0.1")

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):  # a test may have killed the head already
            self.cluster.shutdown()

    def env(self) -> dict[str, str]:
        """What a server needs to run its workers on this cluster."""
        return {
            "ORCHESTRATOR_EXECUTOR": "ray",
            "RAY_ADDRESS": self.address,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        yield cluster
    finally:
        cluster.shutdown()
