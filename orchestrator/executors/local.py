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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.agents.base import LaunchSpec
from orchestrator.core.config import Settings
from orchestrator.executors import cgroups
from orchestrator.executors import sandbox as sandboxing
from orchestrator.executors.cgroups import Cgroups, Limits

log = logging.getLogger(__name__)

# $1 = run dir, $2 = a file for the agent's stdin ("-": the wrapper's own stdin, a pipe the engine
# fills), $3 = the working directory, $4 = the cgroup.procs files to join ("" for none), $5 = the
# seccomp filter to open on descriptor 9 for bwrap ("" for none); then the agent's argv (under
# bwrap when sandboxed). The wrapper joins the worker's cgroups first, so every descendant is
# counted against its limits, enters the working directory itself (posix_spawn has no chdir
# here) and records its PID (an engine that dies before writing the PID to the database still
# finds the worker), then runs the agent, then writes its exit status. A handled TERM/INT/HUP
# trap keeps the wrapper alive to record that status (handled traps reset to default in the
# agent, so it still dies). The exit file is read only once the wrapper is gone; a wrapper killed
# mid-write leaves it empty, which reads as "no exit status". Its own files are private (umask
# 077); the agent gets umask 022 back. Only shell built-ins besides the agent: no extra process,
# and no file the engine must create.
WRAPPER_SCRIPT = (
    'umask 077; d="$1"; i="$2"; g="$4"; s="$5"; '
    'for f in $g; do printf "%s\\n" "$$" >"$f" || { printf "126\\n" >"$d/exit"; exit 126; }; done; '
    'cd "$3" || { printf "127\\n" >"$d/exit"; exit 127; }; shift 5; '
    'trap ":" TERM INT HUP; printf "%s\\n" "$$" >"$d/pid"; : >>"$d/output.log"; '
    'if [ -n "$s" ]; then exec 9<"$s" || { printf "126\\n" >"$d/exit"; exit 126; }; fi; umask 022; '
    'if [ "$i" = - ]; then "$@" >>"$d/output.log" 2>&1; else "$@" <"$i" >>"$d/output.log" 2>&1; fi; '
    'r=$?; umask 077; printf "%s\\n" "$r" >"$d/exit"'
)
# Stdin up to this size goes through a pipe (it fits the pipe buffer, so writing never blocks);
# larger stdin is written to a file first.
PIPE_STDIN_BYTES = 64 * 1024
INHERITABLE_REFRESH_SECONDS = 1.0

OUTPUT_FILE = "output.log"
EXIT_FILE = "exit"
PID_FILE = "pid"
WRAPPER_NAME = "orchestrator-worker"  # $0 of every wrapper: how a worker process is recognised
STDIN_FILE = "stdin"
# The server's own secrets: never in a worker's environment, even if an agent profile names them.
SERVER_ONLY_ENV = ("SECRET_KEY", "DATABASE_URL", "ORCHESTRATOR_DATA_DIR")


def process_start_time(pid: int) -> int | None:
    """Kernel start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)  # read once per worker start: no file object
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    try:
        raw = os.read(fd, 4096).decode(errors="replace")
    except ProcessLookupError:  # the process was reaped between open and read
        return None
    finally:
        os.close(fd)
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[19])


def make_dirs(*paths: Path) -> None:
    """Create directories with one mkdir each where possible. Every mkdir, even one that finds
    the directory there, locks the parent directory, and a worker's directories share parents
    with all the others' (Path.mkdir(parents=True) made five calls for three directories)."""
    for path in paths:
        if path.is_dir():
            continue
        try:
            os.mkdir(path)
        except FileNotFoundError:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            if not path.is_dir():
                raise


def inheritable_descriptors() -> list[int]:
    """Descriptors above 2 a child would inherit (a listening socket passed down by a process
    manager, say): a worker that outlives the server must not keep them open."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # closed meanwhile, such as listdir's own
                if os.get_inheritable(fd):
                    found.append(fd)
    return found


def is_same_process(pid: int, start_time: int) -> bool:
    current = process_start_time(pid)
    if current is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return current == start_time and state != "Z"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_exit_code(run_dir: Path) -> int | None:
    try:
        return int((run_dir / EXIT_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


@dataclass
class WorkerProcess:
    worker_id: str
    pid: int
    start_time: int
    run_dir: Path
    own_child: bool = False  # started by this process (not adopted): ours to reap
    reaped: int | None = None
    pidfd: int | None = None
    stop_signal_sent_at: float | None = None
    kill_sent: bool = False
    applied_paused: bool = False
    exited: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    host: str | None = None  # where it runs, if not the executor's own host (a Ray node id)

    @property
    def output_path(self) -> Path:
        return self.run_dir / OUTPUT_FILE


class LocalExecutor:
    """Starts, signals and watches worker processes on this host."""

    def __init__(self, sandbox: sandboxing.SandboxHost | None = None, groups: Cgroups | None = None) -> None:
        """`sandbox` None runs workers unconfined (ORCHESTRATOR_SANDBOX=off, or a bare executor
        in unit tests); a host whose sandbox cannot work refuses to start workers, with why."""
        self.host = socket.gethostname()
        self.sandbox = sandbox
        self.cgroups = groups
        _raise_fd_limit()
        self._inheritable_fds = inheritable_descriptors()
        self._inheritable_read_at = time.monotonic()

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
        host = sandboxing.detect(settings.data_dir, uid=settings.orchestrator_sandbox_uid)
        if not host.usable:
            log.error(
                "the worker sandbox cannot work on this host, workers will fail to start: %s", host.problem
            )
        elif not groups.usable:
            host = dataclasses.replace(host, problem=f"no worker limits: {groups.problem}")
            log.error("the worker sandbox cannot work on this host: %s", host.problem)
        return cls(host, groups)

    def sandbox_state(self) -> dict[str, object]:
        """What /ready and the dashboard show about confinement."""
        if self.sandbox is None:
            return {"status": "off", "reason": "ORCHESTRATOR_SANDBOX=off: workers run unsandboxed"}
        if not self.sandbox.usable:
            return {"status": "unavailable", "reason": self.sandbox.problem}
        state: dict[str, object] = {"status": "on", "uid": self.sandbox.uid}
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
            memory_mb, max_pids = self.cgroups.limit_of(worker_id)
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

    def _inheritable(self) -> list[int]:
        """Inheritable descriptors, read again at most once a second: listing /proc/self/fd while
        other threads spawn costs more than a spawn, and such descriptors are made on purpose and
        rarely (closing one that was closed since is harmless in the child)."""
        now = time.monotonic()
        if now - self._inheritable_read_at > INHERITABLE_REFRESH_SECONDS:
            self._inheritable_fds, self._inheritable_read_at = inheritable_descriptors(), now
        return self._inheritable_fds

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
        which holds the GIL for long: posix_spawn (vfork + exec in the C library) instead of
        subprocess.Popen, whose Python set-up cost more than the spawn itself. Files the wrapper can
        create itself (output.log, pid, exit) are not created here. The child gets only stdin,
        stdout and stderr: Python opens descriptors close-on-exec, and those marked inheritable
        are closed in the child."""
        if not workdir.is_dir():
            raise FileNotFoundError(f"working directory {workdir} does not exist")
        agent_argv = list(spec.argv)
        seccomp_file = ""
        if self.sandbox is not None:
            if not self.sandbox.usable:
                raise RuntimeError(f"the worker sandbox cannot work on this host: {self.sandbox.problem}")
            box = sandbox or sandboxing.SandboxSpec(workdir, workdir)
            agent_argv = sandboxing.command(self.sandbox, box, agent_argv)
            seccomp_file = str(self.sandbox.seccomp or "")
        procs_files = ""
        if self.cgroups is not None and limits is not None:
            if not self.cgroups.usable:
                raise RuntimeError(f"worker limits cannot be set on this host: {self.cgroups.problem}")
            procs_files = " ".join(str(p) for p in self.cgroups.create(worker_id, limits))
        make_dirs(run_dir)
        data = (spec.stdin_text or "").encode()
        stdin_arg = "-"
        pipe: tuple[int, int] | None = None
        actions: list[tuple[Any, ...]] = []
        if data and len(data) <= PIPE_STDIN_BYTES:
            pipe = os.pipe()
            actions.append((os.POSIX_SPAWN_DUP2, pipe[0], 0))
        else:
            actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
            if data:
                stdin_arg = str(run_dir / STDIN_FILE)
                # The task or options: readable by the worker's user only.
                fd = os.open(stdin_arg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
        actions += [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_DUP2, 1, 2)]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in self._inheritable()]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8")}
        env.update(spec.env)
        for name in SERVER_ONLY_ENV:
            env.pop(name, None)  # whatever a profile says: the server's secrets never reach a worker
        argv = ["/bin/sh", "-c", WRAPPER_SCRIPT, WRAPPER_NAME, str(run_dir), stdin_arg, str(workdir)]
        argv += [procs_files, seccomp_file]
        try:
            pid = os.posix_spawn("/bin/sh", argv + agent_argv, env, file_actions=actions, setsid=True)
        finally:
            if pipe is not None:
                os.close(pipe[0])
        if pipe is not None:
            # Fits the pipe buffer: never blocks, even if the agent never reads its stdin.
            with contextlib.suppress(BrokenPipeError):
                os.write(pipe[1], data)
            os.close(pipe[1])
        # Reading the start time waits until the child's exec has finished; a caller starting many
        # workers reads it afterwards (`read_start_time`) instead of waiting for each exec in turn.
        start_time = (process_start_time(pid) or 0) if read_start_time else 0
        return WorkerProcess(worker_id, pid, start_time, run_dir, own_child=True)

    @staticmethod
    def read_start_time(proc: WorkerProcess) -> None:
        """Fill in the start time of a worker started with `read_start_time=False` (it is still
        our unreaped child, so its /proc entry exists even if it has ended)."""
        if not proc.start_time:
            proc.start_time = process_start_time(proc.pid) or 0

    def wait(self, proc: WorkerProcess, timeout: float) -> int:
        """Wait for a worker this executor started to end, and reap it: its wrapper's exit status."""
        status = self._reap(proc)
        if status is not None:
            return status
        pidfd = os.pidfd_open(proc.pid)
        try:
            readable, _, _ = select.select([pidfd], [], [], timeout)  # readable once it has ended
        finally:
            os.close(pidfd)
        status = self._reap(proc)
        if not readable or status is None:
            raise TimeoutError(f"worker {proc.worker_id} (pid {proc.pid}) still runs after {timeout}s")
        return status

    @staticmethod
    def _reap(proc: WorkerProcess) -> int | None:
        """The exit status if our child has ended (reaped now or before), else None."""
        if proc.reaped is not None:
            return proc.reaped
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            proc.reaped = -1  # reaped elsewhere; the wrapper's exit file still tells how it ended
            return proc.reaped
        if pid == 0:
            return None
        proc.reaped = os.waitstatus_to_exitcode(status)
        return proc.reaped

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
        return WorkerProcess(worker_id, pid, start_time, run_dir)

    def send(self, proc: WorkerProcess, sig: signal.Signals) -> bool:
        """Signal the worker's whole process group, if it is still the process we started."""
        if proc.exited or not is_same_process(proc.pid, proc.start_time):
            return False
        if self.sandbox is not None and sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # bwrap dies of a TERM it does not handle, and the sandbox dies with it (its PID
            # namespace ends): the agent would get no grace period. So a polite signal goes to
            # the group's processes except bwrap's own two (the monitor and the namespace's
            # init); the agent ends, then bwrap with it. KILL, STOP and CONT go to the group.
            return self._signal_agents(proc.pid, sig)
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal_agents(self, group: int, sig: signal.Signals) -> bool:
        assert self.sandbox is not None
        bwrap = os.path.realpath(self.sandbox.bwrap or "/usr/bin/bwrap")
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == group:
                continue
            pid = int(name)
            try:
                with open(f"/proc/{pid}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
                if int(fields[2]) != group or os.readlink(f"/proc/{pid}/exe") == bwrap:
                    continue  # field 5: the process group
                os.kill(pid, sig)
            except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
                continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(group, sig)  # the wrapper: its trap keeps it alive to record the exit status
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
            self._reap(proc)  # the pidfd said it ended: no zombie left behind
        on_exit(proc)

    def unwatch(self, proc: WorkerProcess) -> None:
        if proc.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(proc.pidfd)
            with contextlib.suppress(OSError):
                os.close(proc.pidfd)
            proc.pidfd = None


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
