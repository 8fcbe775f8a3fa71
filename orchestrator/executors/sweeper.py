"""Ended workers' cgroups removed in a thread of their own, off the engine's pass.

An ended worker's groups are empty, but removing them is not free: an `rmdir` per controller,
and on cgroup v1 the kernel empties a group only a moment after its last process is reaped, so
the first tries may find it busy. Done while the pass collects its exits, that was a third of
the collection on every pass (the pass waits for it before it records the exits); nothing needs
the groups gone by then. What the engine reads from them (whether a limit ended the worker) is
read before they are handed over here.

A worker of the same name may start again (a parked worker resumed) before its old groups went:
`cancel` takes the name back first, under the lock the removals run under, so a group is never
removed once its new worker is being put into it. Groups left behind (the engine stopped, or one
that stayed busy) are removed by the next engine's stale-group sweep or `orchestrator gc`.
"""

from __future__ import annotations

import logging
import threading
import time

from orchestrator.executors.cgroups import Cgroups

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.025  # between tries at a group still busy (v1: its last process being reaped)
GIVE_UP_SECONDS = 5.0  # a group busy this long is left to the stale-group sweep
NOW_TRIES = 20  # `remove_now`: tries before it leaves the group to the stale-group sweep


def remove_now(groups: Cgroups, worker_id: str) -> None:
    """The same before returning, for a short-lived executor (a Ray node's, one per worker)."""
    for _ in range(NOW_TRIES):
        if groups.remove(worker_id):
            return
        time.sleep(RETRY_SECONDS)
    log.warning("cgroups of worker %s are not empty yet; gc removes them", worker_id)


class GroupSweeper:
    """Removes the groups of ended workers in a background thread, started on first use."""

    def __init__(self, groups: Cgroups) -> None:
        self.groups = groups
        self._pending: dict[str, float] = {}  # worker id -> when it was handed over (monotonic)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def remove_later(self, worker_id: str) -> None:
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._pending.setdefault(worker_id, time.monotonic())
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="cgroup-sweeper", daemon=True)
                    self._thread.start()
        if closed:
            self._remove(worker_id)
            return
        self._wake.set()

    def cancel(self, worker_id: str) -> None:
        """A worker of this name starts again: its groups are its own from now on."""
        with self._lock:
            self._pending.pop(worker_id, None)

    def wait_idle(self, timeout: float) -> bool:
        """Whether every group handed over was removed (or given up) within `timeout`."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float = 1.0) -> None:
        """Stop, after one last try at what is pending (bounded: a stop must not hang)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._sweep_once():
            time.sleep(RETRY_SECONDS)
        with self._lock:
            self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._sweep_once():
                time.sleep(RETRY_SECONDS)
            with self._lock:
                if self._closed:
                    return

    def _sweep_once(self) -> bool:
        """One try at every pending group; whether some are still pending."""
        with self._lock:
            now = time.monotonic()
            for worker_id, since in list(self._pending.items()):
                if self._remove(worker_id):
                    del self._pending[worker_id]
                elif now - since > GIVE_UP_SECONDS:
                    log.warning("cgroups of worker %s are not empty yet; gc removes them", worker_id)
                    del self._pending[worker_id]
            if not self._pending:
                self._idle.notify_all()
            return bool(self._pending)

    def _remove(self, worker_id: str) -> bool:
        try:
            return self.groups.remove(worker_id)
        except OSError as exc:
            log.warning("could not remove the cgroups of worker %s: %s", worker_id, exc)
            return True  # nothing more to try here: the stale-group sweep has its turn
