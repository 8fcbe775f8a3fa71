"""Worker wrappers parked in their cgroups before they are needed (cgroup v1 hosts).

Moving a process into a cgroup (a write to `cgroup.procs`) takes a kernel-wide lock whose
first writer waits for an RCU grace period: on a loaded host that wait was most of a sandboxed
worker's start overhead, spent on the start path. A parked wrapper is a `/bin/sh` spawned and
moved into a fresh group ahead of time, by a background thread, that waits on a pipe. Starting
a worker then renames that group after the worker (cgroup v1 renames a group with processes in
it; v2 refuses, so there the wrapper joins its group itself), writes the worker's limits and
sends the shell the script that makes it the worker's wrapper (on a pipe, never on disk: it
holds the worker's token): an `exec`, so the PID, the session and the process group the engine
records are the parked shell's.

The parked shell is the leader of its own session, like every wrapper, and runs as the server's
user outside any sandbox: no agent can see it (agents live in their own PID namespaces). A
sandboxed pool leases each parked shell its worker's uid when it parks it (executors/uids.py:
the lease is a lock on an open file only the shell keeps, on descriptor LEASE_FD), so the
lease, and the sweep of what the uid's last holder left, are off the start path too. When its
pipe closes (the engine ended, even by kill -9) it exits, its uid is free again, and its empty
group is removed like any stale worker group (`Cgroups.remove_stale`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from orchestrator.executors import spawn
from orchestrator.executors.cgroups import POOL_PREFIX, Cgroups, Limits
from orchestrator.executors.uids import LEASE_FD, Lease, NoFreeUid, UidRange

log = logging.getLogger(__name__)

# Sources what the engine writes on descriptor 3 (a pipe) once it closes it: the launch script.
# An empty script (the engine ended and the pipe closed unwritten) ends the shell.
PARK_SCRIPT = "cd / || exit 1; . /dev/fd/3"
PARKED_NAME = "orchestrator-parked"  # $0 of a parked shell, until it becomes a wrapper
GROUP_PREFIX = POOL_PREFIX
DEFAULT_SIZE = 16  # a pass's launch at the default depth-0 quota (10) takes only parked wrappers


@dataclass
class Parked:
    pid: int
    group: str  # its groups' name until it is given to a worker
    control: int  # the write end of its descriptor 3: the launch script (-1 once closed)
    stdin: int  # the write end of its stdin: the agent's (-1 once closed)
    lease: Lease | None = None  # its worker's uid (the shell holds the lock; this copy is closed once used)


def launch_script(argv: list[str], env: dict[str, str]) -> str | None:
    """A script that turns a parked shell into `argv` with exactly `env` (beside the PATH and
    LANG it was started with, which `env` sets again) and without descriptor 3, or None if the
    shell cannot say it (a variable name it cannot export): such a worker starts the usual way."""
    if not all(name.isidentifier() and name.isascii() for name in env):
        return None
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    return f"{exports}exec {shlex.join(argv)} 3<&-\n"


class WrapperPool:
    """A few parked wrappers, refilled in a background thread after each one is taken."""

    def __init__(
        self,
        groups: Cgroups,
        inheritable: Callable[[], list[int]],
        size: int = DEFAULT_SIZE,
        uids: UidRange | None = None,
    ) -> None:
        self.groups = groups
        self.uids = uids
        self.size = size
        self._inheritable = inheritable
        self._idle: list[Parked] = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._filled = threading.Condition(self._lock)
        self._closed = False
        self._parking = False
        self._batches = 0  # batches of starts under way (`batch`): no parking meanwhile
        self._thread: threading.Thread | None = None

    @staticmethod
    def supported(groups: Cgroups | None) -> bool:
        return groups is not None and groups.usable and groups.version == "v1"

    def take(self, worker_id: str, limits: Limits) -> Parked | None:
        """A parked wrapper now in the worker's groups, with the worker's limits; None when the
        pool is empty or its group cannot be renamed (the caller starts a wrapper the usual way)."""
        self._start_filling()
        while True:
            with self._lock:
                parked = self._idle.pop() if self._idle else None
                refill = not self._batches
            if refill:
                self._wanted.set()
            if parked is None:
                return None
            if _ended(parked.pid):
                self.discard(parked)
                continue
            try:
                self.groups.rename(parked.group, worker_id)
            except OSError as exc:
                log.warning("could not give parked wrapper %s to worker %s: %s", parked.pid, worker_id, exc)
                self.discard(parked)
                return None
            parked.group = worker_id
            try:
                self.groups.set_limits(worker_id, limits)
            except OSError:
                self.discard(parked)
                raise
            return parked

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Starts taken together (a pass's launch): the pool refills after them, not between
        them. On cgroup v1, moving a new shell into its group holds the cgroup mutex through an
        RCU grace period, and every start's rename and limits wait for that mutex: parking while
        a batch starts made a few of its starts each take as long as the grace period."""
        with self._lock:
            self._batches += 1
        try:
            yield
        finally:
            with self._lock:
                self._batches -= 1
            self._wanted.set()

    def wait_parked(self, timeout: float) -> bool:
        """Whether a parked wrapper is ready, once the one being parked (if any) is: a start that
        found no free uid may have lost it to the shell the pool was parking meanwhile."""
        with self._filled:
            self._filled.wait_for(lambda: bool(self._idle) or not self._parking or self._closed, timeout)
            return bool(self._idle)

    def fill(self, timeout: float) -> bool:
        """Wait until the pool is full (benchmarks and tests); False if it did not fill in time."""
        self._start_filling()
        with self._filled:
            return self._filled.wait_for(lambda: len(self._idle) >= self.size or self._closed, timeout)

    def close(self) -> None:
        """End every parked shell (its pipe closes) and stop refilling."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._filled.notify_all()
        self._wanted.set()
        for parked in idle:
            self.discard(parked)
        # A v1 group empties a moment after its last process is reaped: retry briefly (what is
        # left goes with the stale-group sweep).
        left = [parked.group for parked in idle]
        for _ in range(40):
            left = [group for group in left if not _removed(self.groups, group)]
            if not left:
                break
            time.sleep(0.025)

    def discard(self, parked: Parked) -> None:
        """End a parked shell that will not become a worker, and remove its groups."""
        for fd in (parked.control, parked.stdin):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        parked.control = parked.stdin = -1
        if parked.lease is not None:
            parked.lease.close()  # with the shell gone, the uid is free
        with contextlib.suppress(ProcessLookupError):
            os.kill(parked.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(parked.pid, 0)
        with contextlib.suppress(OSError):
            self.groups.remove(parked.group)

    def _start_filling(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="wrapper-pool", daemon=True)
        self._wanted.set()
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if len(self._idle) >= self.size or self._batches:
                        break  # full, or a batch of starts is under way: its end wakes us
                    self._parking = True  # before its uid lease: see wait_parked
                try:
                    parked = self._park()
                except (OSError, NoFreeUid) as exc:
                    with self._lock:
                        self._parking = False
                        self._filled.notify_all()
                    log.warning("could not park a worker wrapper (workers start without one): %s", exc)
                    break
                with self._lock:
                    self._parking = False
                    keep = not self._closed
                    if keep:
                        self._idle.append(parked)
                    self._filled.notify_all()
                if not keep:
                    self.discard(parked)
                    return

    def _park(self) -> Parked:
        """Spawn one parked shell (its own session, stdout and stderr on /dev/null, stdin a pipe
        only the engine writes) and move it into a fresh pair of groups."""
        lease = self.uids.lease() if self.uids is not None else None
        try:
            return self._spawn_parked(lease)
        except BaseException:
            if lease is not None:
                lease.close()
            raise

    def _spawn_parked(self, lease: Lease | None) -> Parked:
        group = GROUP_PREFIX + uuid.uuid4().hex[:16]
        for path in self.groups.groups(group).values():
            os.mkdir(path)
        stdin, control = os.pipe(), os.pipe()
        actions: list[tuple[object, ...]] = [
            (os.POSIX_SPAWN_DUP2, stdin[0], 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, control[0], 3),
        ]
        kept = {3}
        if lease is not None:  # before the closes: a stale entry of the cached list may reuse its number
            actions.append((os.POSIX_SPAWN_DUP2, lease.fd, LEASE_FD))
            kept.add(LEASE_FD)
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in self._inheritable() if fd not in kept]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8")}
        argv = ["/bin/sh", "-c", PARK_SCRIPT, PARKED_NAME]
        try:
            pid = spawn.posix_spawn("/bin/sh", argv, env, file_actions=actions, setsid=True)
        except OSError:
            os.close(stdin[1])
            os.close(control[1])
            self.groups.remove(group)
            raise
        finally:
            os.close(stdin[0])
            os.close(control[0])
        parked = Parked(pid, group, control[1], stdin[1], lease)
        try:
            for procs in self.groups.procs_files(group):
                fd = os.open(procs, os.O_WRONLY)
                try:
                    os.write(fd, str(pid).encode())
                finally:
                    os.close(fd)
        except OSError:
            self.discard(parked)
            raise
        return parked


def _removed(groups: Cgroups, group: str) -> bool:
    try:
        return groups.remove(group)
    except OSError:
        return False


def _ended(pid: int) -> bool:
    """Whether our parked child has ended (and is reaped now)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0
