"""A real multi-node Ray cluster on this machine (a head and two nodes with their own
`agent_slot` counts), every process on 127.0.0.1, shared by the Ray test group.

Nothing may outlive the group: a node a test kills leaves processes its raylet started (Ray's
dashboard and runtime-env agents, actor processes) that nobody reaps once the raylet is gone, so
every node's processes are recorded while it runs and made sure gone when it is removed, and
the session ends by checking /proc for any process of its clusters."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# Before Ray is imported: keep every address on loopback (Ray otherwise resolves 127.0.0.1 to the
# machine's interface address, and a driver given 127.0.0.1 waits for a GCS it never reaches).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

SLOTS_PER_NODE = 2
# Every process of this session's clusters inherits it (Ray passes its environment on): how the
# final check tells this session's leftovers from other Ray clusters on the machine.
MARKER = "ORCHESTRATOR_TEST_RAY_SESSION"
os.environ[MARKER] = uuid.uuid4().hex
GONE_SECONDS = 60.0
RAYLETS: set[int] = set()  # every raylet of this session's clusters (their fences name them)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
                tree.setdefault(parent, []).append(int(name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def state(pid: int) -> str | None:
    """The process's state letter; None once it is gone (or a zombie: dead, only not reaped)."""
    try:
        letter = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if letter == "Z" else letter


def session_processes() -> list[int]:
    """Live processes of this session's clusters: Ray's (they carry the marker), what they
    started, and the workers' fences (which name the raylet of their node)."""
    wanted = f"{MARKER}={os.environ[MARKER]}".encode()
    ours = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid() or not state(int(name)):
            continue
        with contextlib.suppress(OSError, ValueError):
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            fence = b"orchestrator-fence" in argv[:4]
            if (fence and int(argv[argv.index(b"orchestrator-fence") + 2]) in RAYLETS) or (
                wanted in Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            ):
                ours.append(int(name))
    for pid in list(ours):
        ours.extend(child for child in descendants(pid) if state(child) and child not in ours)
    return ours


def kill_all(pids: set[int] | list[int], deadline: float = GONE_SECONDS) -> list[int]:
    """Wait (bounded) for `pids` to go, SIGKILL what is left; returns what had to be killed."""
    end = time.monotonic() + deadline
    while time.monotonic() < end and any(state(pid) for pid in pids):
        time.sleep(0.2)
    killed = [pid for pid in pids if state(pid)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed


class RayCluster:
    def __init__(self, root: Path, nodes: int = 2, **system_config: Any) -> None:
        self.node_dir = root / "nodes"
        os.environ["ORCHESTRATOR_NODE_DIR"] = str(self.node_dir)  # the nodes inherit it
        self.head_args: dict[str, Any] = {
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            # A node whose raylet died (or hangs) is declared dead within seconds, not ~30 s.
            "_system_config": {
                "health_check_period_ms": 1000,
                "health_check_timeout_ms": 1000,
                "health_check_failure_threshold": 5,
                **system_config,
            },
        }
        self.cluster = ray_cluster_utils.Cluster(initialize_head=True, head_node_args=self.head_args)
        RAYLETS.add(self.raylet(self.cluster.head_node).pid)
        self.nodes = [self.add_node() for _ in range(nodes)]
        self.address: str = self.cluster.address

    def add_node(self, slots: int = SLOTS_PER_NODE) -> Any:
        node = self.cluster.add_node(num_cpus=1, resources={"agent_slot": slots}, node_ip_address="127.0.0.1")
        RAYLETS.add(self.raylet(node).pid)
        self.settle()
        return node

    def restart_head(self, slots: int) -> Any:
        """Kill the head (kill -9) and start another at the same address: a new cluster (no GCS
        fault tolerance), whose head has `slots` agent slots. The nodes of the old one stay
        (their raylets meet a cluster id they do not know)."""
        port = int(self.address.rpartition(":")[2])
        old = self.cluster.head_node
        old.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
        self.cluster.head_node = None
        head = self.cluster.add_node(gcs_server_port=port, resources={"agent_slot": slots}, **self.head_args)
        RAYLETS.add(self.raylet(head).pid)
        assert self.cluster.address == self.address, (self.cluster.address, self.address)
        return head

    def settle(self) -> None:
        """Wait until the GCS's live nodes are exactly the ones this cluster has (added, not
        removed): a node removed by the test before is declared dead only after the health
        check, and until then the scheduler may still place the next test's worker on it."""
        head = self.cluster.head_node
        gcs = head.all_processes.get("gcs_server") if head is not None else None
        if not gcs or gcs[0].process.poll() is not None:
            return  # the test killed the head (and a GCS client here would end this process)
        with contextlib.suppress(Exception):
            self.cluster.wait_for_nodes(timeout=90)

    @staticmethod
    def raylet(node: Any) -> Any:
        """The node's raylet process (a Popen: this test process started it)."""
        return node.all_processes["raylet"][0].process

    def node_processes(self, node: Any) -> set[int]:
        """The raylet and everything it started (agents, actor processes and their fences)."""
        raylet = self.raylet(node).pid
        return {raylet, *descendants(raylet)}

    def kill_raylet(self, node: Any, sig: signal.Signals = signal.SIGKILL) -> set[int]:
        """Signal the node's raylet only (kill -9: the node dies abruptly; SIGSTOP: it hangs).
        Returns the node's processes as they were, for `finish_node`."""
        processes = self.node_processes(node)
        os.kill(self.raylet(node).pid, sig)
        if sig == signal.SIGKILL:
            self.raylet(node).wait()  # reaped, as init would on a real node
        return processes

    def finish_node(self, node: Any, processes: set[int]) -> list[int]:
        """After a test that killed a node: remove it from the cluster and make sure every
        process it had is gone (those that outlive their raylet are killed; returned)."""
        with contextlib.suppress(ProcessLookupError, KeyError):  # KeyError: removed already
            os.kill(self.raylet(node).pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            self.cluster.remove_node(node, allow_graceful=False)
        killed = kill_all(processes)
        self.settle()
        return killed

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


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A module's own cluster whose head has no `agent_slot`: each test adds the nodes it needs
    (so it knows where its workers land) and removes them, every process they had gone."""
    made = RayCluster(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), nodes=0)
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


@pytest.fixture(scope="session", autouse=True)
def no_process_left() -> Iterator[None]:
    """After the group (its clusters shut down), no process of theirs may remain."""
    yield
    left = session_processes()
    described = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left}
    killed = kill_all(left, deadline=30.0)  # a process that is on its way out may finish going
    if killed:
        pytest.fail(f"processes of the Ray test clusters left behind: {[described[p] for p in killed]}")
