"""A worker's process on this host: its identity (PID + start time), its files, and small
process helpers the local executor and other executors built on it share."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT_FILE = "output.log"
EXIT_FILE = "exit"
PID_FILE = "pid"
WRAPPER_NAME = "orchestrator-worker"  # $0 of every wrapper: how a worker process is recognised
STDIN_FILE = "stdin"
UID_FILE = "engine/uid"  # the worker's leased uid, where its agent cannot write (re-adoption reads it)


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


class InheritableDescriptors:
    """`inheritable_descriptors()`, read again at most once every `refresh` seconds, for every
    spawn of one executor (its wrappers and its pool's parked shells): listing /proc/self/fd
    while other threads spawn costs more than a spawn, and such descriptors are made on purpose
    and rarely (closing one that was closed since is harmless in the child). It holds no
    reference to its executor, so a pool's thread sharing it keeps no executor alive."""

    def __init__(self, refresh: float) -> None:
        self.refresh = refresh
        self._fds = inheritable_descriptors()
        self._read_at = time.monotonic()

    def __call__(self) -> list[int]:
        now = time.monotonic()
        if now - self._read_at > self.refresh:
            self._fds, self._read_at = inheritable_descriptors(), now
        return self._fds


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


def record_uid(run_dir: Path, uid: int) -> None:
    """Record the worker's uid in its run dir's engine/ directory (never bound into a sandbox)."""
    path = run_dir / UID_FILE
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{uid}\n".encode())
    finally:
        os.close(fd)


def recorded_uid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / UID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


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
    uid: int | None = None  # the host uid its agent runs as (leased for the wrapper's lifetime)

    @property
    def output_path(self) -> Path:
        return self.run_dir / OUTPUT_FILE

    def reap(self) -> int | None:
        """The exit status if our child has ended (reaped now or before), else None."""
        if self.reaped is not None:
            return self.reaped
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.reaped = -1  # reaped elsewhere; the wrapper's exit file still tells how it ended
            return self.reaped
        if pid == 0:
            return None
        self.reaped = os.waitstatus_to_exitcode(status)
        return self.reaped


def signal_agents(group: int, bwrap: str, sig: signal.Signals) -> bool:
    bwrap = os.path.realpath(bwrap)
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


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


STOPPED_STATES = frozenset("Tt")  # stopped by a signal / by a tracer


def stopped_process_groups() -> set[int]:
    """The process groups with at least one stopped member: one pass over /proc for all adopted
    workers (a worker's agent may have children; the engine signals the whole group)."""
    groups: set[int] = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return groups
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                raw = handle.read().decode(errors="replace")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = raw[raw.rindex(")") + 2 :].split()
        if len(fields) > 2 and fields[0] in STOPPED_STATES:
            groups.add(int(fields[2]))
    return groups


def file_size(path: Path) -> int:
    """The size of a file a worker's wrapper writes; 0 before it exists."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
