"""Workers as local OS processes that outlive the engine that started them.

Each worker runs under a tiny `/bin/sh` wrapper that is the leader of its own session and process
group. The wrapper sends the agent's output straight to a file (durable even if the engine dies)
and writes the agent's exit status to `exit` when it ends, so an engine that restarts can still
learn how its workers ended. Signals go to the whole group, so the agent's children follow.
A process is identified by PID *and* start time, so a reused PID is never mistaken for a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from orchestrator.agents.base import LaunchSpec
from orchestrator.core.config import Settings
from orchestrator.executors import cgroups, netguard
from orchestrator.executors import sandbox as sandboxing
from orchestrator.executors.cgroups import Cgroups, Limits
from orchestrator.executors.launch import (
    PIPE_STDIN_BYTES,
    SERVER_ONLY_ENV,
    WRAPPER_SCRIPT,
    Prepare,
    confine,
    environment,
    spawn_wrapper,
    start_parked,
)
from orchestrator.executors.pool import DEFAULT_SIZE, WrapperPool
from orchestrator.executors.processes import (
    EXIT_FILE,
    OUTPUT_FILE,
    PID_FILE,
    STDIN_FILE,
    WRAPPER_NAME,
    InheritableDescriptors,
    WorkerProcess,
    inheritable_descriptors,
    is_same_process,
    make_dirs,
    pid_alive,
    process_start_time,
    raise_fd_limit,
    read_exit_code,
    recorded_uid,
    signal_agents,
)
from orchestrator.executors.uids import Lease, NoFreeUid, UidRange

__all__ = [
    "EXIT_FILE",
    "OUTPUT_FILE",
    "PID_FILE",
    "PIPE_STDIN_BYTES",
    "SERVER_ONLY_ENV",
    "STDIN_FILE",
    "WRAPPER_NAME",
    "WRAPPER_SCRIPT",
    "LocalExecutor",
    "WorkerProcess",
    "inheritable_descriptors",
    "is_same_process",
    "make_dirs",
    "pid_alive",
    "process_start_time",
    "read_exit_code",
]

log = logging.getLogger(__name__)

INHERITABLE_REFRESH_SECONDS = 1.0
HOLD_SECONDS = 10.0
PARK_WAIT_SECONDS = 30.0  # a shell being parked: its cgroup move waits on the kernel, slow under load


class LocalExecutor:
    """Starts, signals and watches worker processes on this host."""

    def __init__(
        self,
        sandbox: sandboxing.SandboxHost | None = None,
        groups: Cgroups | None = None,
        *,
        pool_size: int = DEFAULT_SIZE,
    ) -> None:
        """`sandbox` None runs workers unconfined (ORCHESTRATOR_SANDBOX=off, or a bare executor
        in unit tests); a host whose sandbox cannot work refuses to start workers, with why.
        `pool_size` parked wrappers (executors/pool.py) take the cgroup move off the start path
        where the host allows it; 0 turns them off."""
        self.host = socket.gethostname()
        self.sandbox = sandbox
        self.network_guard = "none"  # "on" / "off" once for_settings has set it up (or not)
        self.cgroups = groups
        raise_fd_limit()
        self._inheritable = InheritableDescriptors(INHERITABLE_REFRESH_SECONDS)
        # A root server's sandboxed workers each run as a uid of their own (executors/uids.py).
        self.uids: UidRange | None = None
        if sandbox is not None and sandbox.usable and sandbox.uid is not None:
            self.uids = UidRange(sandbox.uid, sandbox.uid_count)
        self.pool: WrapperPool | None = None
        if pool_size > 0 and groups is not None and WrapperPool.supported(groups):
            self.pool = WrapperPool(groups, self._inheritable, pool_size, self.uids)
            weakref.finalize(self, self.pool.close)  # parked shells end with their executor

    @classmethod
    def for_settings(cls, settings: Settings) -> LocalExecutor:
        """The executor the settings ask for: sandboxed unless ORCHESTRATOR_SANDBOX=off."""
        groups = cgroups.detect()
        if not groups.usable:
            log.warning("worker limits (cgroups) cannot work on this host: %s", groups.problem)
        if settings.orchestrator_sandbox == "off":
            log.warning(
                "ORCHESTRATOR_SANDBOX=off: workers run UNSANDBOXED, with the server's view of the machine"
            )
            return cls(None, groups if groups.usable else None)
        host = netguard.sandbox_host(settings)
        guard = settings.orchestrator_sandbox_network_guard
        if not host.usable:
            log.error(
                "the worker sandbox cannot work on this host, workers will fail to start: %s", host.problem
            )
        elif not groups.usable:
            host = dataclasses.replace(host, problem=f"no worker limits: {groups.problem}")
            log.error("the worker sandbox cannot work on this host: %s", host.problem)
        executor = cls(host, groups)
        executor.network_guard = guard
        return executor

    def allow_api(self, url: str) -> None:
        """Open the network guard to the API at `url` (netguard.allow_api)."""
        netguard.allow_api(self.sandbox, self.network_guard, url)

    def sandbox_state(self) -> dict[str, object]:
        """What /ready and the dashboard show about confinement."""
        if self.sandbox is None:
            return {"status": "off", "reason": "ORCHESTRATOR_SANDBOX=off: workers run unsandboxed"}
        if not self.sandbox.usable:
            return {"status": "unavailable", "reason": self.sandbox.problem}
        state: dict[str, object] = {"status": "on", "uid": self.sandbox.uid}
        if self.sandbox.uid is not None:  # one per live worker, from this range
            state["uid_count"] = self.sandbox.uid_count
        state["network_guard"] = self.network_guard
        if self.cgroups is not None:
            state["cgroups"] = self.cgroups.version
        return state

    def can_start(self) -> bool:
        """Whether workers can be started now (a cluster executor says no while unreachable:
        jobs then wait instead of failing)."""
        return True

    def reaches(self, host: str | None) -> bool:
        """Whether a worker recorded on `host` can be adopted by this executor."""
        return host in (None, self.host)

    def cluster_state(self) -> dict[str, object] | None:
        """What /ready shows about a cluster executor (None: workers run on this host)."""
        return None

    def placement(self) -> Callable[[int | None], str | None] | None:
        """For a scheduling pass on a cluster: why a worker of that memory limit has no node to
        run on now (None: it has, and it is counted). None: this host places every worker."""
        return None

    def process_stopped(self, proc: WorkerProcess) -> bool | None:
        """Whether the worker's process group is stopped, if the executor must say (None: the
        reconciler reads /proc itself, once for all workers)."""
        return None

    def memory_limit_mb(self, worker_id: str) -> int | None:
        """The memory limit of a running worker's cgroup (an adopted worker's reservation)."""
        if self.cgroups is None or not self.cgroups.usable:
            return None
        with contextlib.suppress(OSError, KeyError):
            return self.cgroups.limit_of(worker_id)[0]
        return None

    def ending(self, worker_id: str) -> str | None:
        """Why a limit ended the worker, if one did; removes its cgroups (empty by now: the PID
        namespace dies with the agent). Called once the wrapper is gone."""
        if self.cgroups is None or not self.cgroups.usable:
            return None
        try:
            oom, pids = self.cgroups.limit_hit(worker_id)
            # The limits are read only to name the one hit: most workers end within theirs.
            memory_mb, max_pids = self.cgroups.limit_of(worker_id) if oom or pids else (None, None)
        except (OSError, KeyError):
            return None
        # The kernel empties a v1 group a moment after its last process is reaped: retry briefly.
        for _ in range(20):
            if self.cgroups.remove(worker_id):
                break
            time.sleep(0.025)
        else:
            log.warning("cgroups of worker %s are not empty yet; gc removes them", worker_id)
        if oom:
            return f"out of memory: killed at its memory limit of {memory_mb} MiB"
        if pids:
            return f"process limit: it reached its limit of {max_pids} processes (fork bomb contained)"
        return None

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
        """Start the worker. Blocking calls (the engine runs several at once in threads), none of
        which holds the GIL for long. A parked wrapper already in its cgroups, holding a uid
        lease, is used when there is one; otherwise a uid is leased and the wrapper is spawned
        now and joins its groups itself. Files the wrapper can create itself (output.log, pid,
        exit) are not created here."""
        if not workdir.is_dir():
            raise FileNotFoundError(f"working directory {workdir} does not exist")
        if self.sandbox is not None and not self.sandbox.usable:
            raise RuntimeError(f"the worker sandbox cannot work on this host: {self.sandbox.problem}")
        if self.cgroups is not None and limits is not None and not self.cgroups.usable:
            raise RuntimeError(f"worker limits cannot be set on this host: {self.cgroups.problem}")
        make_dirs(run_dir)
        env = environment(spec)
        data = (spec.stdin_text or "").encode()
        box = sandbox or sandboxing.SandboxSpec(workdir, workdir)

        def prepare(lease: Lease | None) -> tuple[list[str], str, Path]:
            return (*confine(self.sandbox, spec, box, lease, run_dir), workdir)

        started = None
        if self.pool is not None and limits is not None:
            started = start_parked(self.pool, worker_id, limits, run_dir, prepare, env, data)
        if started is None:
            started = self._spawn(worker_id, limits, run_dir, prepare, env, data)
        pid, lease = started
        if lease is not None:
            lease.close()
        # Reading the start time waits until the child's exec has finished; a caller starting many
        # workers reads it afterwards (`read_start_time`) instead of waiting for each exec in turn.
        start_time = (process_start_time(pid) or 0) if read_start_time else 0
        proc = WorkerProcess(worker_id, pid, start_time, run_dir, own_child=True)
        proc.uid = lease.uid if lease is not None else None
        return proc

    def _spawn(
        self,
        worker_id: str,
        limits: Limits | None,
        run_dir: Path,
        prepare: Prepare,
        env: dict[str, str],
        data: bytes,
    ) -> tuple[int, Lease | None]:
        """Lease a uid and spawn a wrapper that joins its groups itself. No free uid while the
        pool is parking a shell (which took it): that shell is the worker's."""
        try:
            lease = self.uids.lease() if self.uids is not None else None
        except NoFreeUid:
            if self.pool is None or limits is None or not self.pool.wait_parked(PARK_WAIT_SECONDS):
                raise
            started = start_parked(self.pool, worker_id, limits, run_dir, prepare, env, data)
            if started is None:
                raise
            return started
        try:
            agent_argv, seccomp_file, workdir = prepare(lease)
            procs_files = ""
            if self.cgroups is not None and limits is not None:
                procs_files = " ".join(str(p) for p in self.cgroups.create(worker_id, limits))
            fds, lease_fd = self._inheritable(), lease.fd if lease is not None else -1
            pid = spawn_wrapper(
                run_dir, workdir, procs_files, seccomp_file, agent_argv, env, data, fds, lease_fd, limits
            )
        finally:
            if lease is not None:
                lease.close()  # the wrapper holds the lease now (or nobody: it did not start)
        return pid, lease

    @staticmethod
    def read_start_time(proc: WorkerProcess) -> None:
        """Fill in the start time of a worker started with `read_start_time=False` (it is still
        our unreaped child, so its /proc entry exists even if it has ended)."""
        if not proc.start_time:
            proc.start_time = process_start_time(proc.pid) or 0

    def wait(self, proc: WorkerProcess, timeout: float) -> int:
        """Wait for a worker this executor started to end, and reap it: its wrapper's exit status."""
        status = proc.reap()
        if status is not None:
            return status
        pidfd = os.pidfd_open(proc.pid)
        try:
            readable, _, _ = select.select([pidfd], [], [], timeout)  # readable once it has ended
        finally:
            os.close(pidfd)
        status = proc.reap()
        if not readable or status is None:
            raise TimeoutError(f"worker {proc.worker_id} (pid {proc.pid}) still runs after {timeout}s")
        return status

    def find_started(self, run_dir: Path) -> tuple[int, int] | None:
        """(PID, start time) of a wrapper that recorded its PID in `run_dir` and still runs: the
        process must be a wrapper for this very run dir, so a reused PID is never taken for it."""
        try:
            pid = int((run_dir / PID_FILE).read_text().split()[0])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError, PermissionError):
            return None
        if WRAPPER_NAME.encode() not in argv or str(run_dir).encode() not in argv:
            return None
        start_time = process_start_time(pid)
        return (pid, start_time) if start_time is not None else None

    def adopt(self, worker_id: str, pid: int, start_time: int, run_dir: Path) -> WorkerProcess | None:
        """Take over a worker started by an engine that died; None if it is gone."""
        if not is_same_process(pid, start_time):
            return None
        proc = WorkerProcess(worker_id, pid, start_time, run_dir)
        proc.uid = recorded_uid(run_dir)  # its wrapper still holds the uid's lease
        return proc

    def send(self, proc: WorkerProcess, sig: signal.Signals) -> bool:
        """Signal the worker's whole process group, if it is still the process we started."""
        if proc.exited or not is_same_process(proc.pid, proc.start_time):
            return False
        if self.sandbox is not None and sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # bwrap dies of a TERM it does not handle, and the sandbox dies with it (its PID
            # namespace ends): the agent would get no grace period. So a polite signal goes to
            # the group's processes except bwrap's own two (the monitor and the namespace's
            # init); the agent ends, then bwrap with it. KILL, STOP and CONT go to the group.
            return signal_agents(proc.pid, self.sandbox.bwrap or "/usr/bin/bwrap", sig)
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        if sig in (signal.SIGSTOP, signal.SIGCONT) and self.cgroups is not None and self.cgroups.usable:
            # A process that left the group (setsid, a double fork) would run on while the worker
            # is paused: its cgroup holds it all the same (SIGKILL needs no help: the sandbox's
            # PID namespace dies with bwrap).
            self.cgroups.signal_members(proc.worker_id, sig)
        return True

    def hold(self, proc: WorkerProcess) -> bool:
        """Stop every process of a running worker and wait (at most HOLD_SECONDS) until each is
        stopped: the engine reads its live worktree as root (a checkpoint before a delegation),
        and an agent swapping a file for a link to a host file between git's lstat and its open
        would have that file read into the commit. True if the caller must send SIGCONT after."""
        if self.cgroups is None or not self.cgroups.usable or not self.send(proc, signal.SIGSTOP):
            return False
        self.cgroups.wait_stopped(proc.worker_id, HOLD_SECONDS)
        return True

    def watch(self, proc: WorkerProcess, on_exit: Callable[[WorkerProcess], None]) -> None:
        """Call `on_exit` in the event loop as soon as the process ends (pidfd, no polling)."""
        loop = asyncio.get_running_loop()
        try:
            proc.pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            loop.call_soon(self._exited, proc, on_exit)
            return

        def _ready() -> None:
            self._exited(proc, on_exit)

        loop.add_reader(proc.pidfd, _ready)

    def _exited(self, proc: WorkerProcess, on_exit: Callable[[WorkerProcess], None]) -> None:
        if proc.exited:
            return
        proc.exited = True
        self.unwatch(proc)
        if proc.own_child:
            proc.reap()  # the pidfd said it ended: no zombie left behind
        on_exit(proc)

    def unwatch(self, proc: WorkerProcess) -> None:
        if proc.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(proc.pidfd)
            with contextlib.suppress(OSError):
                os.close(proc.pidfd)
            proc.pidfd = None

    def close(self) -> None:
        """End the parked wrappers (an engine that stops; they also end when this process does)."""
        if self.pool is not None:
            self.pool.close()
