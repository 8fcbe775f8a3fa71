"""Watching Ray workers from the engine: their output and exit, and the failures that end them.

The executor's thread polls every watched actor for new output from the offset the engine has
mirrored so far, into the engine's own run dir (output.log and exit), which the engine reads as
for a local worker: logs reach the database once, offset-based. It also decides when a worker is
lost, from what Ray says, not from silence alone:

- its node is dead in Ray's node table (checked every NODES_SECONDS for every watched worker,
  also while its actor still answers: a node whose raylet hangs is declared dead by Ray's health
  check while the processes on it run on) -> `lost: node <id> died`;
- its actor died on a node that lives -> `lost: its Ray actor died`;
- its actor, on a node that lives, left a poll unanswered longer than `RAY_ACTOR_SILENCE_SECONDS`
  (a hung or stopped actor process: nobody could pause, end or read the worker through it) ->
  `lost: its Ray actor did not answer for <n> s`, and the actor is killed (Ray kills its process,
  the fence its process group). A long call it is busy with (a checkpoint's push) does not count.
  Each worker has at most one poll under way: a silent actor delays nobody else's round;
- the cluster's head (GCS) stayed unreachable longer than the grace (`RAY_HEAD_GRACE_SECONDS`,
  by default Ray's own `gcs_rpc_server_reconnect_timeout_s`, 60 s, after which every node's raylet
  gives up on the GCS and exits, its workers with it) -> `lost: the Ray cluster's head was
  unreachable for <n> s`. Within the grace nothing is declared: a head that comes back (GCS fault
  tolerance, KubeRay restarting it) finds its workers running and mirrored from their offsets.
  A head whose port accepts connections but whose GCS does not answer (hung) counts as
  unreachable from its first unanswered read (`GcsSilent`) until a read answers again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from orchestrator.executors.local import EXIT_FILE, WorkerProcess
from orchestrator.executors.processes import file_size
from orchestrator.workspaces.setup import FAILURE_FILE

log = logging.getLogger(__name__)

CALL_TIMEOUT = 30.0
ROUND_WAIT = 0.5  # a round waits this long for the polls asked; the rest are collected later
NODES_SECONDS = 1.0  # how often the watched workers' nodes are looked up in Ray's node table
VERDICT_SECONDS = 30.0  # how long a worker's end waits for Ray to say whether its node died
GCS_READ_SECONDS = 5.0
T = TypeVar("T")


@dataclass
class Watched:
    proc: WorkerProcess
    on_exit: Callable[[WorkerProcess], None]
    loop: asyncio.AbstractEventLoop


class GcsSilent(TimeoutError):
    """The cluster's head accepts connections but its GCS does not answer (hung, overloaded):
    a TCP probe cannot tell, a bounded read can."""


def node_died(host: str | None) -> str:
    return f"lost: node {host} died"


class Watcher:
    """The watched workers of one executor, polled by its thread."""

    def __init__(
        self, ray: Any, actor_of: Callable[[str], Any], head_grace: float, silence: float = 60.0
    ) -> None:
        self.ray = ray
        self.actor_of = actor_of
        self.head_grace = head_grace
        self.silence = silence
        self.asked: dict[str, float] = {}  # worker id -> since when its poll is under way
        self.busy: collections.Counter[str] = collections.Counter()  # long calls (checkpoints) under way
        self.unanswered: set[str] = set()  # ended for their silent actor: killed, not asked to end
        self.watched: dict[str, Watched] = {}
        self.lost: dict[str, str] = {}  # worker id -> why it ended (read once by `ending`)
        self.abandoned: set[str] = set()  # lost while the head was away: actors to kill on its return
        self.lock = threading.Lock()
        self.nodes_at = 0.0
        self.unreachable_since: float | None = None
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-gcs")
        self.reading_since: float | None = None  # the reader's read under way, since when

    def add(self, proc: WorkerProcess, on_exit: Callable[[WorkerProcess], None]) -> None:
        with self.lock:
            self.watched[proc.worker_id] = Watched(proc, on_exit, asyncio.get_running_loop())

    def remove(self, proc: WorkerProcess) -> None:
        with self.lock:
            self.watched.pop(proc.worker_id, None)
        self.asked.pop(proc.worker_id, None)

    def items(self) -> list[Watched]:
        with self.lock:
            return list(self.watched.values())

    # ------------------------------------------------------------ the cluster reachable

    def poll(self) -> None:
        """One round while the cluster answers: output and ends, then (now and then) nodes."""
        self.unreachable_since = None
        items = self.items()
        if items:
            self._poll(items)
        now = time.monotonic()
        if now - self.nodes_at >= NODES_SECONDS:
            self.nodes_at = now
            self.check_nodes()

    def gcs_read(self, read: Callable[[], T]) -> T:
        """A read from the GCS, bounded: Ray's own waits for as long as the GCS is away (the
        driver reconnects forever), which would stop this thread from noticing that it is.
        Raises GcsSilent at once while an earlier read has gone unanswered for longer than the
        bound (a hung GCS: the reads would only queue behind it)."""
        since = self.reading_since
        if since is not None and (waited := time.monotonic() - since) > GCS_READ_SECONDS:
            raise GcsSilent(f"the Ray cluster's GCS has not answered a read for {waited:.0f} s")
        try:
            return self.reader.submit(self._timed, read).result(timeout=GCS_READ_SECONDS)
        except concurrent.futures.TimeoutError:
            raise GcsSilent(f"the Ray cluster's GCS did not answer within {GCS_READ_SECONDS:.0f} s") from None

    def _timed(self, read: Callable[[], T]) -> T:
        self.reading_since = time.monotonic()
        try:
            return read()
        finally:
            self.reading_since = None

    def nodes_alive(self) -> dict[str, bool]:
        nodes: list[dict[str, Any]] = self.gcs_read(self.ray.nodes)
        return {node["NodeID"]: bool(node["Alive"]) for node in nodes}

    def verdict(self, host: str | None) -> str:
        """Why an actor that stopped answering is gone: its node, once Ray's health check has
        declared it dead (waited for, bounded: the actor's process may die first), else itself."""
        deadline = time.monotonic() + VERDICT_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if not self.nodes_alive().get(host or "", False):
                    return node_died(host)
            time.sleep(0.5)
        return "lost: its Ray actor died"

    def check_nodes(self) -> None:
        """Workers whose node Ray declared dead end lost, whether their actor answers or not."""
        items = self.items()
        if not items:
            return
        alive = self.nodes_alive()
        for item in items:
            if not alive.get(item.proc.host or "", False):
                self.end(item, node_died(item.proc.host))

    def _poll(self, items: list[Watched]) -> None:
        """One call to the driver for the round (ray_driver.py `poll_round`): each worker asked
        from its mirrored offset unless its poll is still under way, the answers read."""
        now = time.monotonic()
        asks = []
        for item in items:
            worker_id = item.proc.worker_id
            if worker_id in self.asked:
                continue
            actor = self.actor_of(worker_id)
            if actor is None:
                self.end(item, "lost: its Ray actor is gone")
                continue
            asks.append((worker_id, actor, "poll", (file_size(item.proc.output_path),)))
            self.asked[worker_id] = now
        watched = {item.proc.worker_id: item for item in items}
        keys = [worker_id for worker_id in list(self.asked) if worker_id in watched]
        if not keys:
            return
        answers, pending = self.ray.poll_round(asks, keys, ROUND_WAIT)
        alive: dict[str, bool] | None = None
        for worker_id in keys:
            if worker_id not in answers and worker_id not in pending:
                self.asked.pop(worker_id, None)  # not under way (a new driver): asked again
        for worker_id, (ok, value) in answers.items():
            self.asked.pop(worker_id, None)
            item = watched[worker_id]
            if not ok:
                if isinstance(value, self.ray.exceptions.RayActorError):
                    alive = alive if alive is not None else self.nodes_alive()
                    if not alive.get(item.proc.host or "", False):
                        self.end(item, node_died(item.proc.host))
                    elif isinstance(value, self.ray.exceptions.ActorDiedError):
                        self.end(item, "lost: its Ray actor died")
                else:  # asked again next round
                    log.warning("worker %s: its poll failed: %s", worker_id, str(value)[:300])
                continue
            try:
                self._mirror(item, value)
            except OSError as exc:  # this worker's mirror only (a full disk): asked again next round
                log.warning("worker %s: mirroring its output failed: %s", worker_id, exc)
        for worker_id in pending:  # asked again once answered (its node's death: `check_nodes`)
            self._unanswered(watched[worker_id], now)

    def _unanswered(self, item: Watched, now: float) -> None:
        worker_id = item.proc.worker_id
        since = self.asked.get(worker_id)
        if since is None:  # unwatched meanwhile
            return
        if self.busy[worker_id] > 0:
            self.asked[worker_id] = now  # its poll waits behind the long call: not silent
        elif now - since > self.silence:
            self.unanswered.add(worker_id)
            self.end(item, f"lost: its Ray actor did not answer for {now - since:.0f} s")

    def _mirror(self, item: Watched, result: dict[str, Any]) -> None:
        """Append the new output to the engine's copy; on the end, its exit status too."""
        proc = item.proc
        if result["output"]:
            with open(proc.output_path, "ab") as handle:
                handle.write(result["output"])
        if result["node_gone"]:
            self.end(item, node_died(proc.host))
        elif result["ended"]:
            if result.get("setup_failed"):  # where the engine reads it (workspaces/setup.py)
                failed = proc.run_dir / "home" / FAILURE_FILE
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(str(result["setup_failed"]))
            if result["exit_code"] is not None:
                path = proc.run_dir / EXIT_FILE
                temporary = path.with_suffix(".tmp")
                temporary.write_text(f"{result['exit_code']}\n")
                os.replace(temporary, path)
            self.end(item, None)

    # ------------------------------------------------------------ the head away

    def head_away(self) -> None:
        """A round while the cluster's head does not answer: after the grace, every watched
        worker is lost (its actor killed once the head is back, if it survived)."""
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
        away = now - self.unreachable_since
        if away < self.head_grace:
            return
        for item in self.items():
            self.abandoned.add(item.proc.worker_id)
            self.end(item, f"lost: the Ray cluster's head was unreachable for {away:.0f} s")

    def kill_abandoned(self) -> None:
        """Actors of workers declared lost while the head was away, killed now it is back."""
        for worker_id in list(self.abandoned):
            try:
                actor = self.actor_of(worker_id)
                if actor is not None:
                    with contextlib.suppress(Exception):
                        self.ray.get(actor.kill_group.remote(), timeout=CALL_TIMEOUT)
                    self.ray.kill(actor, no_restart=True)
            except Exception:  # the driver or the cluster failed meanwhile: tried again next round
                continue
            self.abandoned.discard(worker_id)

    def end(self, item: Watched, lost: str | None) -> None:
        with self.lock:
            if self.watched.pop(item.proc.worker_id, None) is None:
                return
        self.asked.pop(item.proc.worker_id, None)
        if lost is not None:
            self.lost[item.proc.worker_id] = lost
            log.warning("worker %s: %s", item.proc.worker_id, lost)

        def fire() -> None:
            if not item.proc.exited:
                item.proc.exited = True
                item.on_exit(item.proc)

        with contextlib.suppress(RuntimeError):  # the engine's loop is closed: the next one adopts
            item.loop.call_soon_threadsafe(fire)
