"""Placement on a Ray cluster: which workers the engine should start now, and which wait.

Ray holds an actor that asks for more than any node has free until one has room. A start that
waited for that held a launcher thread (and the engine's pass) for as long as it waited. So the
scheduler asks, before giving a worker a start, whether some node has a free `agent_slot` and
the worker's memory: Ray's view of every node's free resources, refreshed by the executor's
thread, minus the starts this executor made that Ray's view does not show yet. A worker that
does not fit stays IDLE with the reason; it starts at a later pass, once a node has room. A
start that still finds no room (another engine took it meanwhile) gives up after a short wait
and the worker waits the same way (`NotPlaced`).

Ray's view comes from `ray._private.state` (per-node free resources, a DeveloperAPI; the actor
table, "for debugging only"), here and in the actor's own death check (ray_node.py). The public
alternatives do not fit: `ray.util.state` asks the dashboard's API server (`ray[default]`,
aiohttp, a dashboard process on the head: none of which a plain `ray` install or a cluster
started without the dashboard has), `ray.available_resources()` sums the whole cluster (a slot
free on one node and memory free on another would look like room), and `ray.nodes()` gives each
node's total resources, not what is free. Both reads are direct GCS calls, bounded by the
executor (`Watcher.gcs_read`); a Ray upgrade that changes them fails loudly in tests/ray.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from orchestrator.executors.cgroups import MIB
from orchestrator.executors.ray_cluster import SLOT

VIEW_LAG_SECONDS = 2.0  # how long after a start Ray's view of free resources may not show it
REFRESH_SECONDS = 0.5
FORGET_SECONDS = 30.0

Place = Callable[[int | None], str | None]


def waiting_reason(memory_mb: int | None) -> str:
    if memory_mb:
        return f"waiting for a Ray node with a free {SLOT} and {memory_mb} MiB of memory"
    return f"waiting for a Ray node with a free {SLOT}"


class Room:
    """The cluster's free `agent_slot`s and memory per node, as Ray last said, with this
    executor's own recent starts taken off until Ray's view shows them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free: dict[str, tuple[float, float]] | None = None  # node id -> (slots, memory bytes)
        self.read_at = 0.0
        # Starts Ray's view may not show yet: worker id -> (memory bytes, when placed or None).
        self.starts: dict[str, tuple[float, float | None]] = {}

    def refresh(self, read: Callable[[], dict[str, dict[str, float]]]) -> None:
        """Read Ray's view (the executor's thread, every REFRESH_SECONDS; a bounded read of
        `ray._private.state.available_resources_per_node`, a DeveloperAPI: no dashboard)."""
        now = time.monotonic()
        if now - self.read_at < REFRESH_SECONDS:
            return
        per_node = read()
        free = {
            node: (float(resources.get(SLOT, 0.0)), float(resources.get("memory", 0.0)))
            for node, resources in per_node.items()
        }
        with self.lock:
            self.free, self.read_at = free, now
            self.starts = {
                worker: (memory, placed)
                for worker, (memory, placed) in self.starts.items()
                if placed is None or now - placed < VIEW_LAG_SECONDS
            }

    def forget(self) -> None:
        with self.lock:
            self.free = None

    def starting(self, worker_id: str, memory_mb: int | None) -> None:
        """A start under way: count it until Ray's view shows it."""
        with self.lock:
            self.starts[worker_id] = ((memory_mb or 0) * MIB, None)

    def started(self, worker_id: str) -> None:
        """Placed (or given up): Ray's view shows it within VIEW_LAG_SECONDS from now."""
        with self.lock:
            if worker_id in self.starts:
                self.starts[worker_id] = (self.starts[worker_id][0], time.monotonic())

    def fits(self, memory_mb: int | None) -> bool:
        """Whether some node, as Ray last said, has room for one more such worker: an actor Ray
        has not placed yet waits for a worker process there (a slow start), not for room."""
        with self.lock:
            nodes = {node: [slots, memory] for node, (slots, memory) in (self.free or {}).items()}
        return self.free is None or _take(nodes, (memory_mb or 0) * MIB)

    def place(self) -> Place | None:
        """For one scheduling pass: a function saying why a worker of that memory limit cannot
        be placed now (None: it can, and its room is taken for the rest of the pass); None when
        Ray's view is not known yet (the start itself then finds out)."""
        with self.lock:
            if self.free is None:
                return None
            nodes = {node: [slots, memory] for node, (slots, memory) in self.free.items()}
            pending = [memory for memory, _ in self.starts.values()]
        for memory in pending:  # a start Ray's view may not show yet: off the node with most room
            _take(nodes, memory)

        def place(memory_mb: int | None) -> str | None:
            return None if _take(nodes, (memory_mb or 0) * MIB) else waiting_reason(memory_mb)

        return place


def _take(nodes: dict[str, list[float]], memory: float) -> bool:
    fitting = [room for room in nodes.values() if room[0] >= 1 and room[1] >= memory]
    if not fitting:
        return False
    room = max(fitting, key=lambda r: (r[0], r[1]))
    room[0] -= 1
    room[1] -= memory
    return True


def placed(info: dict[str, Any]) -> bool:
    """Whether Ray has placed the actor (its row of the GCS's actor table) on a node: created,
    or being created there (a worker process leased for it has an address); else it still
    waits for room."""
    if info.get("State") in (None, "DEPENDENCIES_UNREADY"):
        return False
    return info.get("State") != "PENDING_CREATION" or bool((info.get("Address") or {}).get("Port"))


def actor_node(info: dict[str, Any]) -> str | None:
    """The node Ray placed the actor on, once it has (its row of the GCS's actor table)."""
    node = str((info.get("Address") or {}).get("NodeID") or "")
    return node if node.strip("f0") else None  # none yet: empty, or the nil id


def forget(ray: Any, actor: Any, name: str, namespace: str) -> None:
    """Kill an actor that did not start its worker, and wait (bounded) until its name is free
    for the worker's next start (which finds an actor by name)."""
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + FORGET_SECONDS
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except Exception:  # ValueError: no such actor (any other: nothing better to do)
            return
        time.sleep(0.1)
