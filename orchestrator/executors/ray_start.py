"""A worker's start on its Ray node, seen from the engine: waiting for Ray to place the actor,
then for the node's answer (however long it takes: a clone), and what a start that fails was.

- No node has room within PLACE_WAIT -> NotPlaced: the worker waits IDLE.
- The node the actor was placed on dies (or is declared dead) before it answered -> Lost,
  `lost: node <id> died`, as for a worker lost mid-run: not `could not start`, which would blame
  the worker or its set-up for what the cluster did.
- The node's own code raised (a sandbox that cannot work, a clone refused) -> RuntimeError with
  the node's message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from orchestrator.executors.cgroups import Limits
from orchestrator.executors.ray_cluster import Lost, NotPlaced
from orchestrator.executors.ray_driver import DriverLost
from orchestrator.executors.ray_placement import Room, actor_node, forget, placed, waiting_reason
from orchestrator.executors.ray_watch import GcsSilent, Watcher, node_died

NAMESPACE = "orchestrator"
PLACE_WAIT = 10.0  # a start Ray has not placed by then gives up: the worker waits IDLE
START_TIMEOUT = 1800.0  # a placed start (its node cloning a repository, say) may take this long


def actor_name(worker_id: str) -> str:
    return f"worker-{worker_id}"


class Start:
    """One start under way: the actor's `start` call and the node Ray placed it on."""

    def __init__(
        self, ray: Any, watcher: Watcher, room: Room, create: Callable[[], Any], worker_id: str
    ) -> None:
        self.ray, self.watcher, self.room = ray, watcher, room
        self.create, self.worker_id = create, worker_id
        self.actor: Any = None
        self.node: str | None = None

    def wait(self, request: Any, limits: Limits | None) -> dict[str, Any]:
        """The node's answer to the start (its identity of the worker's process). The engine's
        Ray driver ending meanwhile (ray_driver.py) is waited out: the start is asked again of
        the actor, made or found by name, once a new driver is connected (a second start answers
        with the first's process; a cluster restarted meanwhile gets its first)."""
        since = time.monotonic()
        while True:
            try:
                return self._wait(request, limits, since)
            except DriverLost:
                self._driver_back(since)

    def _driver_back(self, since: float) -> None:
        while not self.ray.is_initialized():
            if self.ray.closed:
                raise RuntimeError("the engine is stopping") from None
            if time.monotonic() - since > START_TIMEOUT:
                raise RuntimeError(f"no Ray driver to start it within {START_TIMEOUT:.0f} s") from None
            time.sleep(0.5)

    def _wait(self, request: Any, limits: Limits | None, since: float) -> dict[str, Any]:
        ray = self.ray
        self.actor = self.create()
        ref = self.actor.start.remote(request)
        try:
            while not ray.wait([ref], timeout=1.0)[0]:
                if time.monotonic() - since > START_TIMEOUT:
                    raise RuntimeError(f"its Ray node did not start it within {START_TIMEOUT:.0f} s")
                if self._node_dead():
                    raise Lost(node_died(self.node))
                memory = limits.memory_mb if limits else None
                if time.monotonic() - since > PLACE_WAIT and not self._placed(memory):
                    self.forget()
                    raise NotPlaced(waiting_reason(memory))
            ident: dict[str, Any] = ray.get(ref)
            return ident
        except DriverLost:
            raise
        except ray.exceptions.RayActorError:
            # The actor died before it answered: its node, once Ray says so (bounded), else itself.
            self._find_node()
            self.forget()
            raise Lost(self.watcher.verdict(self.node) if self.node else "lost: its Ray actor died") from None
        except ray.exceptions.RayError as exc:
            self._find_node()
            self.forget()
            cause = getattr(exc, "cause", None)  # the node's own exception (a sandbox that cannot work)
            where = f"Ray node {self.node}" if self.node else "its Ray node"
            raise RuntimeError(f"on {where}: {str(cause or exc)[:300]}") from None
        except RuntimeError as exc:
            if not isinstance(exc, NotPlaced):
                self.forget()
            raise

    def _find_node(self) -> None:
        if self.node is None:
            with contextlib.suppress(Exception):
                self.node = self.watcher.gcs_read(lambda: actor_node(self.ray.actor_info(self.actor)))

    def _node_dead(self) -> bool:
        """Whether the node Ray placed the actor on is dead in Ray's node table."""
        self._find_node()
        if self.node is None:
            return False
        try:
            return not self.watcher.nodes_alive().get(self.node, False)
        except Exception:  # the GCS did not answer: nothing said
            return False

    def _placed(self, memory: int | None) -> bool:
        """Placed, or about to be: some node has room for it (a slow start, not a full cluster).
        While the GCS does not answer, as if placed: the start waits on (a node that dies then
        ends it Lost), rather than fail the worker for what the cluster's head did."""
        try:
            row = self.watcher.gcs_read(lambda: self.ray.actor_info(self.actor))
            return placed(row) or self.room.fits(memory)
        except GcsSilent:
            return True

    def forget(self) -> None:
        forget(self.ray, self.actor, actor_name(self.worker_id), NAMESPACE)
