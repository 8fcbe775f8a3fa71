"""Workers on a Ray cluster: each one a detached, named actor that runs it on some node.

The engine keeps its interface to workers (executors/local.py): start, signal, watch, adopt,
ending. Ray places each actor where a custom resource `agent_slot` and the worker's memory
limit fit, detects lost nodes, and lets an engine that restarts find its workers' actors again
by name (one fixed namespace, a name derived from the worker id), so no worker starts twice.
`max_restarts=0`: the orchestrator, not Ray, decides what a failed worker becomes.

One thread talks to the cluster, through a Ray driver in a process of its own (ray_link.py): it
connects, reads which nodes have room (ray_placement.py: a worker no node has room for waits
IDLE instead of holding a launcher thread), and watches every worker (ray_watch.py: its output
mirrored into the engine's run dir, and the failures that end it `lost: ...`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.agents.base import LaunchSpec
from orchestrator.core.config import Settings
from orchestrator.executors import netguard
from orchestrator.executors import sandbox as sandboxing
from orchestrator.executors.cgroups import MIB, Limits
from orchestrator.executors.local import LocalExecutor, WorkerProcess
from orchestrator.executors.ray_cluster import SLOT
from orchestrator.executors.ray_driver import DriverLost
from orchestrator.executors.ray_link import ClusterLink
from orchestrator.executors.ray_node import StartRequest, copied_files, files_to_ship
from orchestrator.executors.ray_placement import Place
from orchestrator.executors.ray_start import NAMESPACE, Start, actor_name
from orchestrator.executors.ray_watch import CALL_TIMEOUT, node_died
from orchestrator.workspaces.remote import RemoteCheckout

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 1800.0  # a worker's end waits this long for its node to push its branch


class RayExecutor(ClusterLink, LocalExecutor):
    """Starts, signals and watches workers as Ray actors (engine side)."""

    def __init__(
        self,
        address: str | None,
        sandbox: sandboxing.SandboxHost | None,
        sandbox_uid: int,
        head_grace: float = 60.0,
        silence: float = 60.0,
    ) -> None:
        # No cgroups here: the node applies the limits, Ray admits by memory.
        LocalExecutor.__init__(self, sandbox, None)
        ClusterLink.__init__(self, address, head_grace, silence)
        self.sandbox_uid = sandbox_uid
        self.hosts: dict[str, str] = {}  # worker id -> its node
        self.pushes: set[str] = set()  # workers whose node pushes a branch at their end
        self.checkouts: dict[str, RemoteCheckout] = {}  # set before a repository worker's start
        self.push_errors: dict[str, str] = {}  # why a node could not push a worker's branch
        self.skipped: dict[str, list[str]] = {}  # files a node left out of a worker's commit
        self.thread.start()

    @classmethod
    def for_settings(cls, settings: Settings) -> RayExecutor:
        sandbox = None
        if settings.orchestrator_sandbox != "off":
            sandbox = netguard.sandbox_host(settings)  # this host's guard (other hosts: docs/SANDBOX.md)
        executor = cls(
            settings.ray_address,
            sandbox,
            settings.orchestrator_sandbox_uid,
            settings.ray_head_grace_seconds,
            settings.ray_actor_silence_seconds,
        )
        executor.network_guard = settings.orchestrator_sandbox_network_guard
        return executor

    def reaches(self, host: str | None) -> bool:
        return True  # any node of the cluster: its actor is found by name

    def cluster_state(self) -> dict[str, object] | None:
        if self.problem is not None:
            return {"status": "unavailable", "executor": "ray", "reason": self.problem}
        return {"status": "connected", "executor": "ray", "address": self.address or "auto"}

    def _require_cluster(self, timeout: float = 0.0) -> None:
        if not self.connected.wait(timeout):
            raise RuntimeError(self.problem or "the Ray cluster is not connected")

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
        """Create (or find, by name) the worker's actor and start the worker there once; raises
        NotPlaced if no node had room for it (it waits IDLE), Lost if its node died (ray_start.py)."""
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
            copied=copied_files(workdir) if checkout is not None else {},
        )
        options: dict[str, Any] = {
            "name": actor_name(worker_id),
            "namespace": NAMESPACE,
            "lifetime": "detached",
            "num_cpus": 0,
            "resources": {SLOT: 1},
            "max_restarts": 0,
            "get_if_exists": True,
        }
        if limits is not None:
            options["memory"] = limits.memory_mb * MIB
        self.room.starting(worker_id, limits.memory_mb if limits else None)
        create = lambda: self.actor_class.options(**options).remote()  # noqa: E731
        start = Start(self.ray, self.watcher, self.room, create, worker_id)
        try:
            ident = start.wait(request, limits)
        finally:
            self.room.started(worker_id)  # counted until Ray's view shows it (or a while)
        if checkout is not None:
            shutil.rmtree(workdir, ignore_errors=True)  # the set-up's copies, sent to the node
        self.actors[worker_id] = start.actor
        return self._process(worker_id, ident, run_dir)

    def _process(self, worker_id: str, ident: dict[str, Any], run_dir: Path) -> WorkerProcess:
        proc = WorkerProcess(worker_id, int(ident["pid"]), int(ident["start_time"]), run_dir)
        proc.host = str(ident["node_id"])
        self.hosts[worker_id] = proc.host
        if ident.get("checkout"):
            self.pushes.add(worker_id)
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
        except self.ray.exceptions.ActorUnavailableError:
            raise  # its node may be dying: the take-over is retried once Ray knows
        except self.ray.exceptions.RayActorError:
            return None
        if ident["pid"] != pid or (start_time and ident["start_time"] != start_time):
            return None
        run_dir.mkdir(parents=True, exist_ok=True)  # an engine on another host: its mirror starts here
        return self._process(worker_id, ident, run_dir)

    def end_unrecorded(self, worker_id: str) -> None:
        """Kill the worker's actor, found by name, and its process group, if a start no engine
        recorded made one (its engine died mid-start, the worker was cancelled meanwhile)."""
        self._require_cluster(timeout=CALL_TIMEOUT)
        actor = self._actor(worker_id)
        if actor is None:
            return
        log.warning("worker %s: ended, yet its actor lives (a start not recorded): killing it", worker_id)
        with contextlib.suppress(self.ray.exceptions.RayError):  # bounded: a start still under way
            self.ray.get(actor.kill_group.remote(), timeout=CALL_TIMEOUT)
        self.ray.kill(actor, no_restart=True)
        self.actors.pop(worker_id, None)

    def lost_reason(self, host: str | None) -> str | None:
        """Why a worker found gone at a take-over is gone, if its node is known dead."""
        if not host or not self.can_start():
            return None
        with contextlib.suppress(Exception):
            if not self.watcher.nodes_alive().get(host, False):
                return node_died(host)
        return None

    def send(self, proc: WorkerProcess, sig: signal.Signals) -> bool:
        if proc.exited or proc.worker_id in self.watcher.lost or not self.can_start():
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
        branch (a repository job; also when terminated, or lost on a node that lives on). A node
        that dies before it pushed the branch loses the worker's work: lost too."""
        lost = self.watcher.lost.pop(worker_id, None)
        host, pushes = self.hosts.pop(worker_id, None), worker_id in self.pushes
        self.pushes.discard(worker_id)
        if worker_id in self.watcher.abandoned:  # the head is away: its actor is killed once back
            return self._not_pushed(worker_id, pushes, lost)
        if worker_id in self.watcher.unanswered:  # asked nothing more: killed (its fence ends the rest)
            self.watcher.unanswered.discard(worker_id)
            if pushes:
                self.push_errors[worker_id] = "its Ray actor did not answer: the work did not come back"
            self._kill(worker_id, self._actor_or_none(worker_id))
            return lost
        actor: Any = None
        ended: dict[str, Any] = {}
        for attempt in (1, 2):  # a driver that ended meanwhile: once more, with its successor
            try:
                actor = self._actor(worker_id)
                if actor is None:  # gone with its cluster (a new one at the address), or never made
                    return self._not_pushed(worker_id, pushes, lost)
                method = actor.finish if lost is None else actor.kill_group
                ended = self.ray.get(method.remote(), timeout=PUSH_TIMEOUT)
            except DriverLost as exc:
                if attempt == 1 and self.driver_back(CALL_TIMEOUT):
                    continue
                if pushes:
                    self.push_errors[worker_id] = f"{exc} before its node pushed the worker's branch"
            except self.ray.exceptions.RayActorError:
                if pushes:  # its work did not come back (what its branch holds is a checkpoint's, if any)
                    lost = lost or self.watcher.verdict(host)
                    why = lost.removeprefix("lost: ")
                    self.push_errors[worker_id] = f"{why} before it pushed the worker's branch"
            except Exception:  # nothing to push, nothing to say
                log.warning("worker %s: its actor did not end cleanly", worker_id, exc_info=True)
            break
        if actor is None:  # it could not be looked up (no driver): the watcher's thread kills it
            self.watcher.abandoned.add(worker_id)
        if ended.get("push_error"):
            self.push_errors[worker_id] = str(ended["push_error"])
        if ended.get("skipped"):
            self.skipped[worker_id] = [str(path) for path in ended["skipped"]]
        self._kill(worker_id, actor)
        return lost or (str(ended["limit"]) if ended.get("limit") else None)

    def _actor_or_none(self, worker_id: str) -> Any:
        try:
            return self._actor(worker_id)
        except Exception:  # no driver now: the watcher's thread kills it later
            self.watcher.abandoned.add(worker_id)
            return None

    def _kill(self, worker_id: str, actor: Any) -> None:
        """Kill its actor; one that could not be killed now is killed by the watcher's thread."""
        self.actors.pop(worker_id, None)
        if actor is None:
            return
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            self.watcher.abandoned.add(worker_id)

    def _not_pushed(self, worker_id: str, pushes: bool, lost: str | None) -> str | None:
        """A repository worker lost where its node could not push its branch: its result must
        say so, not report what the branch holds (a checkpoint's commit) as its work."""
        if pushes and lost:
            why = lost.removeprefix("lost: ")
            self.push_errors[worker_id] = f"{why} before it pushed the worker's branch"
        return lost

    def push_error(self, worker_id: str) -> str | None:
        """Why the worker's node could not push its branch, if it could not (asked once)."""
        return self.push_errors.pop(worker_id, None)

    def checkpoint(self, worker_id: str) -> None:
        """Its node commits and pushes the worker's live worktree onto its branch (a delegation's
        base: remote_workspace.checkpoint fetches it); raises RuntimeError saying why not."""
        if not self.can_start():
            raise RuntimeError(f"cannot checkpoint worker {worker_id}: {self.problem or 'no Ray cluster'}")
        actor = self._actor(worker_id)
        if actor is None:
            return  # it has ended: its branch came back at its end
        self.watcher.busy[worker_id] += 1  # its polls wait behind the push: not a silent actor
        try:
            done = self.ray.get(actor.checkpoint.remote(), timeout=PUSH_TIMEOUT)
        except self.ray.exceptions.RayError as exc:
            raise RuntimeError(f"cannot checkpoint worker {worker_id}: {str(exc)[:300]}") from None
        finally:
            self.watcher.busy[worker_id] -= 1
            if self.watcher.busy[worker_id] <= 0:
                del self.watcher.busy[worker_id]
        if done.get("push_error"):
            raise RuntimeError(f"cannot checkpoint worker {worker_id}: {done['push_error']}")

    def skipped_files(self, worker_id: str) -> list[str]:
        """The files of max_file_mb or more the worker's node left out of its commit (asked once)."""
        return self.skipped.pop(worker_id, [])

    def watch(self, proc: WorkerProcess, on_exit: Callable[[WorkerProcess], None]) -> None:
        self.watcher.add(proc, on_exit)

    def unwatch(self, proc: WorkerProcess) -> None:
        self.watcher.remove(proc)

    def placement(self) -> Place | None:
        """For a scheduling pass: whether a worker fits on some node now (ray_placement.py)."""
        return self.room.place() if self.can_start() else None

    def close(self) -> None:
        self.stopping.set()
        self.ray.close()
