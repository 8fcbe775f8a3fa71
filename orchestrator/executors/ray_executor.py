"""Workers on a Ray cluster: each one a detached, named actor that runs it on some node.

The engine keeps its interface to workers (executors/local.py): start, signal, watch, adopt,
ending. Ray places each actor where a custom resource `agent_slot` and the worker's memory
limit fit, detects lost nodes, and lets an engine that restarts find its workers' actors again
by name (one fixed namespace, a name derived from the worker id), so no worker starts twice.
`max_restarts=0`: the orchestrator, not Ray, decides what a failed worker becomes.

One thread talks to the cluster: it connects (and keeps saying why not, for /ready: jobs wait
while it cannot), and polls every watched actor for new output from the offset the engine has
mirrored so far. The mirror (the engine's own run dir: output.log and exit) is what the engine
reads, exactly as for a local worker, so logs reach the database once, offset-based. A worker
whose node died, or whose actor died, ends with `lost: ...` as its reason (`ending`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.agents.base import LaunchSpec
from orchestrator.core.config import Settings
from orchestrator.executors import netguard
from orchestrator.executors import sandbox as sandboxing
from orchestrator.executors.cgroups import MIB, Limits
from orchestrator.executors.local import (
    EXIT_FILE,
    LocalExecutor,
    WorkerProcess,
)
from orchestrator.executors.processes import file_size
from orchestrator.executors.ray_cluster import probe
from orchestrator.executors.ray_node import StartRequest, WorkerNode, files_to_ship
from orchestrator.workspaces.remote import RemoteCheckout

log = logging.getLogger(__name__)

NAMESPACE = "orchestrator"
POLL_SECONDS = 0.25
CALL_TIMEOUT = 30.0
PLACE_TIMEOUT = 120.0  # how long a start waits for a node with room
CONNECT_RETRY_SECONDS = 2.0
RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
RECONNECT_FOREVER_SECONDS = 10 * 365 * 24 * 3600
PROBE_SECONDS = 2.0  # how often a connected executor checks that the cluster still answers
PUSH_TIMEOUT = 1800.0  # a worker's end waits this long for its node to push its branch


def actor_name(worker_id: str) -> str:
    return f"worker-{worker_id}"


@dataclass
class Watched:
    proc: WorkerProcess
    on_exit: Callable[[WorkerProcess], None]
    loop: asyncio.AbstractEventLoop


class RayExecutor(LocalExecutor):
    """Starts, signals and watches workers as Ray actors (engine side)."""

    def __init__(self, address: str | None, sandbox: sandboxing.SandboxHost | None, sandbox_uid: int) -> None:
        # No cgroups here: the node applies the limits, Ray admits by memory.
        super().__init__(sandbox, None)
        # A Ray driver exits its whole process when the cluster's GCS stays away longer than
        # this: the server must outlive the cluster (it says so in /ready and reconnects).
        os.environ[RECONNECT_ENV] = str(RECONNECT_FOREVER_SECONDS)
        import ray

        self.ray = ray
        self.address = address
        self.sandbox_uid = sandbox_uid
        self.problem: str | None = f"connecting to the Ray cluster at {address or 'auto'}"
        self.actor_class: Any = None
        self.actors: dict[str, Any] = {}
        self.watched: dict[str, Watched] = {}
        self.lost: dict[str, str] = {}
        self.checkouts: dict[str, RemoteCheckout] = {}  # set before a repository worker's start
        self.push_errors: dict[str, str] = {}  # why a node could not push a worker's branch
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.last_probe = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ray-executor", daemon=True)
        self.thread.start()

    @classmethod
    def for_settings(cls, settings: Settings) -> RayExecutor:
        sandbox = None
        if settings.orchestrator_sandbox != "off":
            sandbox = netguard.sandbox_host(settings)  # this host's guard (other hosts: docs/SANDBOX.md)
        executor = cls(settings.ray_address, sandbox, settings.orchestrator_sandbox_uid)
        executor.network_guard = settings.orchestrator_sandbox_network_guard
        return executor

    # ------------------------------------------------------------ the cluster

    def _connect(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            probe(self.address)
            ray.init(
                address=self.address or "auto",
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        self.actor_class = ray.remote(WorkerNode)
        self.problem = None
        self.connected.set()
        log.info("connected to the Ray cluster at %s", self.address or "auto")

    def _run(self) -> None:
        while not self.stopping.is_set():
            if not self.connected.is_set():
                try:
                    self._connect()
                except Exception as exc:
                    self.problem = f"Ray cluster at {self.address or 'auto'} unreachable: {exc}"[:500]
                    log.warning("%s", self.problem)
                    self.stopping.wait(CONNECT_RETRY_SECONDS)
                    continue
            try:
                self._check_reachable()
                if self.problem is None:
                    self._poll_once()
            except Exception:
                log.exception("polling Ray workers failed; retrying")
            self.stopping.wait(POLL_SECONDS)

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
        self.problem = None

    def can_start(self) -> bool:
        return self.connected.is_set() and self.problem is None

    def reaches(self, host: str | None) -> bool:
        return True  # any node of the cluster: its actor is found by name

    def cluster_state(self) -> dict[str, object] | None:
        if self.problem is not None:
            return {"status": "unavailable", "executor": "ray", "reason": self.problem}
        return {"status": "connected", "executor": "ray", "address": self.address or "auto"}

    def _require_cluster(self, timeout: float = 0.0) -> None:
        if not self.connected.wait(timeout):
            raise RuntimeError(self.problem or "the Ray cluster is not connected")

    def _actor(self, worker_id: str) -> Any:
        handle = self.actors.get(worker_id)
        if handle is None:
            try:
                handle = self.ray.get_actor(actor_name(worker_id), namespace=NAMESPACE)
            except ValueError:
                return None
            self.actors[worker_id] = handle
        return handle

    def _nodes_alive(self) -> dict[str, bool]:
        nodes: list[dict[str, Any]] = self.ray.nodes()  # type: ignore[no-untyped-call]
        return {node["NodeID"]: bool(node["Alive"]) for node in nodes}

    # ------------------------------------------------------------ the executor interface

    def memory_limit_mb(self, worker_id: str) -> int | None:
        return None

    @staticmethod
    def read_start_time(proc: WorkerProcess) -> None:
        return None  # the node read it

    def find_started(self, run_dir: Path) -> tuple[int, int] | None:
        return None  # the PID file is on the node; a start by name finds the actor instead

    def start(
        self,
        worker_id: str,
        spec: LaunchSpec,
        workdir: Path,
        run_dir: Path,
        *,
        read_start_time: bool = True,
        sandbox: sandboxing.SandboxSpec | None = None,
        limits: Limits | None = None,
    ) -> WorkerProcess:
        """Create (or find, by name) the worker's actor and start the worker there once."""
        self._require_cluster()
        checkout = self.checkouts.pop(worker_id, None)
        if checkout is None and (workdir / ".git").exists():
            raise RuntimeError("a worktree on the server's disk cannot reach a Ray node")
        request = StartRequest(
            worker_id,
            spec,
            str(workdir),
            str(run_dir),
            sandbox if self.sandbox is not None else None,
            limits,
            sandboxed=self.sandbox is not None,
            sandbox_uid=self.sandbox_uid,
            sandbox_uid_count=self.sandbox.uid_count if self.sandbox is not None else 1,
            files=files_to_ship(run_dir),
            checkout=checkout,
        )
        options: dict[str, Any] = {
            "name": actor_name(worker_id),
            "namespace": NAMESPACE,
            "lifetime": "detached",
            "num_cpus": 0,
            "resources": {"agent_slot": 1},
            "max_restarts": 0,
            "get_if_exists": True,
        }
        if limits is not None:
            options["memory"] = limits.memory_mb * MIB
        actor = self.actor_class.options(**options).remote()
        ray = self.ray
        try:
            ident = ray.get(actor.start.remote(request), timeout=PLACE_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            raise RuntimeError(
                f"no Ray node had room for it (agent_slot 1, memory {limits and limits.memory_mb} MiB)"
            ) from None
        except ray.exceptions.RayError as exc:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            cause = getattr(exc, "cause", None)  # the node's own exception (a sandbox that cannot work)
            raise RuntimeError(f"on its Ray node: {str(cause or exc)[:300]}") from None
        self.actors[worker_id] = actor
        proc = WorkerProcess(worker_id, int(ident["pid"]), int(ident["start_time"]), run_dir)
        proc.host = str(ident["node_id"])
        return proc

    def adopt(self, worker_id: str, pid: int, start_time: int, run_dir: Path) -> WorkerProcess | None:
        """The worker's actor, found by name; None if it is gone. Raises while the cluster is
        unreachable: the take-over is retried later instead of declaring workers lost."""
        self._require_cluster(timeout=CALL_TIMEOUT)
        actor = self._actor(worker_id)
        if actor is None:
            return None
        try:
            ident = self.ray.get(actor.identity.remote(), timeout=CALL_TIMEOUT)
        except self.ray.exceptions.RayActorError:
            return None
        if ident["pid"] != pid or (start_time and ident["start_time"] != start_time):
            return None
        proc = WorkerProcess(worker_id, pid, int(ident["start_time"]), run_dir)
        proc.host = str(ident["node_id"])
        return proc

    def send(self, proc: WorkerProcess, sig: signal.Signals) -> bool:
        if proc.exited or proc.worker_id in self.lost or not self.can_start():
            return False  # not sent (a pause is tried again by the next pass)
        actor = self._actor(proc.worker_id)
        if actor is None:
            return False
        try:
            return bool(self.ray.get(actor.signal.remote(int(sig)), timeout=CALL_TIMEOUT))
        except self.ray.exceptions.RayError:
            return False

    def process_stopped(self, proc: WorkerProcess) -> bool | None:
        actor = self._actor(proc.worker_id)
        if actor is None:
            return False
        try:
            return bool(self.ray.get(actor.stopped.remote(), timeout=CALL_TIMEOUT))
        except self.ray.exceptions.RayError:
            return False

    def expect_checkout(self, worker_id: str, checkout: RemoteCheckout) -> None:
        """The worktree the worker's node makes at its start (the server published the base)."""
        self.checkouts[worker_id] = checkout

    def ending(self, worker_id: str) -> str | None:
        """Why it ended, if lost or at a limit; then its process group goes, its node pushes its
        branch (a repository job; also when terminated, or lost on a node that lives on)."""
        lost = self.lost.pop(worker_id, None)
        actor = self._actor(worker_id)
        self.actors.pop(worker_id, None)
        if actor is None:
            return lost
        ended: dict[str, Any] = {}
        with contextlib.suppress(Exception):  # a dead actor: nothing to push, nothing to say
            method = actor.finish if lost is None else actor.kill_group
            ended = self.ray.get(method.remote(), timeout=PUSH_TIMEOUT)
        if ended.get("push_error"):
            self.push_errors[worker_id] = str(ended["push_error"])
        with contextlib.suppress(Exception):
            self.ray.kill(actor, no_restart=True)
        return lost or (str(ended["limit"]) if ended.get("limit") else None)

    def push_error(self, worker_id: str) -> str | None:
        """Why the worker's node could not push its branch, if it could not (asked once)."""
        return self.push_errors.pop(worker_id, None)

    def watch(self, proc: WorkerProcess, on_exit: Callable[[WorkerProcess], None]) -> None:
        with self.lock:
            self.watched[proc.worker_id] = Watched(proc, on_exit, asyncio.get_running_loop())

    def unwatch(self, proc: WorkerProcess) -> None:
        with self.lock:
            self.watched.pop(proc.worker_id, None)

    # ------------------------------------------------------------ polling

    def _poll_once(self) -> None:
        with self.lock:
            items = list(self.watched.values())
        if not items:
            return
        refs: dict[Any, Watched] = {}
        for item in items:
            actor = self._actor(item.proc.worker_id)
            if actor is None:
                self._end(item, "lost: its Ray actor is gone")
                continue
            refs[actor.poll.remote(file_size(item.proc.output_path))] = item
        if not refs:
            return
        ready, pending = self.ray.wait(list(refs), num_returns=len(refs), timeout=CALL_TIMEOUT)
        alive: dict[str, bool] | None = None
        for ref in ready:
            item = refs[ref]
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                alive = alive if alive is not None else self._nodes_alive()
                if not alive.get(item.proc.host or "", False):
                    self._end(item, f"lost: node {item.proc.host} died")
                elif isinstance(exc, self.ray.exceptions.ActorDiedError):
                    self._end(item, "lost: its Ray actor died")
                continue
            self._mirror(item, result)
        for ref in pending:
            item = refs[ref]
            alive = alive if alive is not None else self._nodes_alive()
            if not alive.get(item.proc.host or "", False):
                self._end(item, f"lost: node {item.proc.host} died")

    def _mirror(self, item: Watched, result: dict[str, Any]) -> None:
        """Append the new output to the engine's copy; on the end, its exit status too."""
        proc = item.proc
        if result["output"]:
            with open(proc.output_path, "ab") as handle:
                handle.write(result["output"])
        if result["node_gone"]:
            self._end(item, f"lost: node {proc.host} died")
        elif result["ended"]:
            if result["exit_code"] is not None:
                path = proc.run_dir / EXIT_FILE
                temporary = path.with_suffix(".tmp")
                temporary.write_text(f"{result['exit_code']}\n")
                os.replace(temporary, path)
            self._end(item, None)

    def _end(self, item: Watched, lost: str | None) -> None:
        with self.lock:
            if self.watched.pop(item.proc.worker_id, None) is None:
                return
        if lost is not None:
            self.lost[item.proc.worker_id] = lost
            log.warning("worker %s: %s", item.proc.worker_id, lost)

        def fire() -> None:
            if not item.proc.exited:
                item.proc.exited = True
                item.on_exit(item.proc)

        with contextlib.suppress(RuntimeError):  # the engine's loop is closed: the next one adopts
            item.loop.call_soon_threadsafe(fire)

    def close(self) -> None:
        self.stopping.set()
