"""The Ray executor's hold on its cluster: one thread that connects (and keeps saying why not,
for /ready: jobs wait while it cannot), reads which nodes have room (ray_placement.py), and
watches every worker (ray_watch.py), through a Ray driver in a process of its own
(ray_driver.py): a driver Ray aborts is replaced, and a head that came back as a new cluster
ends the workers of the old one `lost: ...`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from orchestrator.executors.ray_cluster import probe
from orchestrator.executors.ray_driver import DriverLost, RayDriver
from orchestrator.executors.ray_node import WorkerNode
from orchestrator.executors.ray_placement import Room
from orchestrator.executors.ray_start import NAMESPACE, actor_name
from orchestrator.executors.ray_watch import GcsSilent, Watcher

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
CONNECT_RETRY_SECONDS = 2.0
RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
RECONNECT_FOREVER_SECONDS = 10 * 365 * 24 * 3600
PROBE_SECONDS = 2.0  # how often a connected executor checks that the cluster still answers


class ClusterLink:
    """The connection to the cluster, its driver, and the thread that watches the workers."""

    def __init__(self, address: str | None, head_grace: float, silence: float) -> None:
        # A Ray driver exits its whole process when the cluster's GCS stays away longer than
        # this: it must outlive the cluster (it says so in /ready and reconnects).
        os.environ[RECONNECT_ENV] = str(RECONNECT_FOREVER_SECONDS)  # the driver's process inherits it
        self.ray = RayDriver()  # in a process of its own: Ray may abort it, not the server
        self.session: str | None = None  # the cluster's, at the last connect
        self.address = address
        self.problem: str | None = f"connecting to the Ray cluster at {address or 'auto'}"
        self.actor_class: Any = None
        self.actors: dict[str, Any] = {}
        self.watcher = Watcher(self.ray, self._actor, head_grace, silence)
        self.room = Room()
        self.silent: str | None = None  # the head's GCS stopped answering reads (GcsSilent)
        self.connected = threading.Event()
        self.last_probe = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ray-executor", daemon=True)

    def _connect(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            probe(self.address)
            session = ray.init(
                address=self.address or "auto",
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
            if self.session is not None and session != self.session:
                self._cluster_replaced()
            self.session = session
        self.actor_class = ray.remote(WorkerNode)
        self.problem = None
        self.connected.set()
        log.info("connected to the Ray cluster at %s", self.address or "auto")

    def _driver_lost(self) -> None:
        """The driver's process ended (Ray aborts it when the head comes back as a new cluster):
        say so, and connect a new one; its workers are asked for again by name."""
        self.connected.clear()
        self.problem = f"{self.ray.ended}; reconnecting to the Ray cluster at {self.address or 'auto'}"
        log.warning("%s", self.problem)
        self.actors.clear()
        self.watcher.asked.clear()  # refs of the driver that ended
        self.room.forget()

    def _cluster_replaced(self) -> None:
        """The head came back as a new cluster: nothing of the old one is left (its nodes' raylets
        exit on the new cluster's id, and each worker's fence with them)."""
        for item in self.watcher.items():
            where = self.address or "auto"
            self.watcher.end(item, f"lost: the Ray cluster at {where} was restarted as a new cluster")
        self.watcher.abandoned.clear()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if self.connected.is_set() and not self.ray.alive():
                self._driver_lost()
            if not self.connected.is_set():
                try:
                    self._connect()
                except Exception as exc:
                    self.problem = f"Ray cluster at {self.address or 'auto'} unreachable: {exc}"[:500]
                    log.warning("%s", self.problem)
                    if self.session is not None:  # connected once (a driver that ended): the grace runs
                        self._head_away()
                    self.stopping.wait(CONNECT_RETRY_SECONDS)
                    continue
            try:
                self._check_reachable()
                if self.problem is None:
                    self.room.refresh(lambda: self.watcher.gcs_read(self.ray.available_resources_per_node))
                    self.watcher.poll()
                    self.watcher.kill_abandoned()
                else:
                    self._head_away()
            except GcsSilent as exc:
                # As unreachable: /ready says so, starts and signals wait, the grace runs. Until a
                # read answers again (`_check_reachable`): a connection accepted proves nothing.
                self._gcs_silent(exc)
                self._head_away()
            except DriverLost:
                pass  # said and replaced at the top of the next round
            except Exception:
                log.exception("polling Ray workers failed; retrying")
            self.stopping.wait(POLL_SECONDS)

    def _gcs_silent(self, exc: GcsSilent) -> None:
        where = f"Ray cluster at {self.address or 'auto'}"
        try:
            probe(self.address)
        except OSError as gone:  # not hung: gone (a read under way when the head died)
            self.problem = f"{where} unreachable: {gone}"[:500]
            return
        self.silent = self.problem = f"{where} does not answer: {exc}"
        log.warning("%s", self.problem)

    def _head_away(self) -> None:
        self.room.forget()
        self.watcher.head_away()

    def _check_reachable(self) -> None:
        """Say (for /ready, and to hold starts and signals) when the cluster went away after
        connecting: Ray's own calls would wait for it instead of failing."""
        now = time.monotonic()
        if now - self.last_probe < PROBE_SECONDS:
            return
        self.last_probe = now
        try:
            probe(self.address)
        except OSError as exc:
            if self.problem is None:
                log.warning("the Ray cluster at %s is unreachable: %s", self.address, exc)
            self.problem = f"Ray cluster at {self.address} unreachable: {exc}"[:500]
            return
        if self.silent is not None:
            try:
                self.watcher.gcs_read(self.ray.nodes)
            except GcsSilent:
                self.problem = self.silent
                return
            log.info("the Ray cluster at %s answers again", self.address or "auto")
            self.silent = None
        self.problem = None

    def can_start(self) -> bool:
        return self.connected.is_set() and self.problem is None

    def driver_back(self, timeout: float) -> bool:
        """Wait (bounded) until a driver that ended has a connected successor."""
        deadline = time.monotonic() + timeout
        while not (self.connected.is_set() and self.ray.is_initialized()):
            if self.stopping.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def _actor(self, worker_id: str) -> Any:
        handle = self.actors.get(worker_id)
        if handle is None:
            try:
                handle = self.ray.get_actor(actor_name(worker_id), namespace=NAMESPACE)
            except ValueError:
                return None
            self.actors[worker_id] = handle
        return handle
