"""Memory and process limits per worker, through cgroups (v2, or the v1 controllers).

Production hosts use cgroup v2 (one hierarchy, `memory.max`, `pids.max`, `memory.events`); some
hosts, this project's test machines among them, mount only the v1 controllers (`memory/`,
`pids/`, with `memory.limit_in_bytes` and `memory.oom_control`) next to a controller-less v2
hierarchy. `detect()` finds which, once, at start-up.

A worker's groups are named after the worker, under a parent group of the server's own cgroup,
so an engine that restarts finds them again (adoption, gc) without any record. The wrapper
writes its own PID into each group's `cgroup.procs` before it starts the agent, so every
descendant is counted. When the worker ends, `ending()` reads whether a limit killed it and
removes the groups.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
PARENT_NAME = "orchestrator-workers"
POOL_PREFIX = "pool-"  # the groups of parked wrappers (executors/pool.py), not yet a worker's
MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    pids: int
    cpu_weight: int | None = None  # 1-10000, cgroup v2 `cpu.weight` only
    file_mb: int | None = None  # RLIMIT_FSIZE the wrapper sets for the agent (not a cgroup limit)


@dataclass(frozen=True)
class Cgroups:
    """Where this host's worker groups live: `version` "v2" or "v1", `bases` the parent group of
    every worker group, per controller ("" for the single v2 hierarchy)."""

    version: str
    bases: dict[str, Path]
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None

    def groups(self, worker_id: str) -> dict[str, Path]:
        return {controller: base / worker_id for controller, base in self.bases.items()}

    def procs_files(self, worker_id: str) -> list[Path]:
        return [group / "cgroup.procs" for group in self.groups(worker_id).values()]

    def create(self, worker_id: str, limits: Limits) -> list[Path]:
        """Make the worker's groups with its limits; the `cgroup.procs` files the wrapper joins."""
        groups = self.groups(worker_id)
        for group in groups.values():
            with contextlib.suppress(FileExistsError):
                os.mkdir(group)
        self.set_limits(worker_id, limits)
        return [group / "cgroup.procs" for group in groups.values()]

    def rename(self, old: str, new: str) -> None:
        """Give a group (in every hierarchy) another name, with its processes in it: cgroup v1
        only (v2 refuses). An empty group of a worker that ran before under that name is
        removed first; on failure the groups renamed so far are put back."""
        done: list[str] = []
        try:
            for controller, base in self.bases.items():
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(base / new)
                os.rename(base / old, base / new)
                done.append(controller)
        except OSError:
            for controller in done:
                with contextlib.suppress(OSError):
                    os.rename(self.bases[controller] / new, self.bases[controller] / old)
            raise

    def set_limits(self, worker_id: str, limits: Limits) -> None:
        """Write the worker's limits into its (existing) groups."""
        groups = self.groups(worker_id)
        memory = str(limits.memory_mb * MIB)
        if self.version == "v2":
            group = groups[""]
            _write(group / "memory.max", memory)
            _write(group / "memory.swap.max", "0", optional=True)  # no escape into swap
            _write(group / "pids.max", str(limits.pids))
            if limits.cpu_weight is not None:
                _write(group / "cpu.weight", str(limits.cpu_weight), optional=True)
        else:
            _write(groups["memory"] / "memory.limit_in_bytes", memory)
            _write(groups["memory"] / "memory.memsw.limit_in_bytes", memory, optional=True)
            _write(groups["pids"] / "pids.max", str(limits.pids))
            if limits.cpu_weight is not None and "cpu" in groups:
                _write(
                    groups["cpu"] / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)), optional=True
                )

    def limit_hit(self, worker_id: str) -> tuple[bool, bool]:
        """(killed by the memory limit, stopped by the process limit) for the worker's groups."""
        groups = self.groups(worker_id)
        if self.version == "v2":
            oom = _counter(groups[""] / "memory.events", "oom_kill")
            pids = _counter(groups[""] / "pids.events", "max")
        else:
            oom = _counter(groups["memory"] / "memory.oom_control", "oom_kill")
            pids = _counter(groups["pids"] / "pids.events", "max")
        return oom > 0, pids > 0

    def limit_of(self, worker_id: str) -> tuple[int | None, int | None]:
        """(memory limit in MiB, pids limit) as the groups hold them, if they exist."""
        groups = self.groups(worker_id)
        mem_file = (
            groups[""] / "memory.max" if self.version == "v2" else groups["memory"] / "memory.limit_in_bytes"
        )
        pids_file = groups["" if self.version == "v2" else "pids"] / "pids.max"
        return _int(mem_file, MIB), _int(pids_file, 1)

    def processes(self, worker_id: str) -> list[int]:
        """Host PIDs of every process in the worker's (pids) group: those that left its session
        and process group too (setsid, a double fork), which a signal to the group misses."""
        group = self.groups(worker_id)["" if self.version == "v2" else "pids"]
        try:
            return [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
        except (FileNotFoundError, ValueError):
            return []

    def signal_members(self, worker_id: str, sig: int) -> int:
        """Send `sig` to every process in the worker's group, again until a pass finds none it
        has not signalled (a member that forked just before it was stopped). A PID is signalled
        through a pidfd opened while the process is still in the group, so a PID reused by an
        unrelated process meanwhile is never signalled. Returns how many were signalled."""
        import signal as signals

        done: set[int] = set()
        for _ in range(64):
            fresh = [pid for pid in self.processes(worker_id) if pid not in done]
            if not fresh:
                break
            for pid in fresh:
                done.add(pid)
                with contextlib.suppress(OSError):
                    fd = os.pidfd_open(pid)
                    try:
                        if _in_group(pid, worker_id):
                            signals.pidfd_send_signal(fd, sig)
                    finally:
                        os.close(fd)
        return len(done)

    def all_stopped(self, worker_id: str) -> bool:
        """Whether every process in the worker's group is stopped (or has ended)."""
        for pid in self.processes(worker_id):
            try:
                state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # ended meanwhile
            if state not in (b"T", b"t", b"Z", b"X"):
                return False
        return True

    def wait_stopped(self, worker_id: str, timeout: float) -> bool:
        """Wait (at most `timeout` s: a process in uninterruptible sleep stops only when its
        system call ends) until every process in the worker's group is stopped."""
        deadline = time.monotonic() + timeout
        while not self.all_stopped(worker_id):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def remove(self, worker_id: str) -> bool:
        """Remove the worker's groups (they must be empty); True if none is left."""
        gone = True
        for group in self.groups(worker_id).values():
            try:
                os.rmdir(group)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise
                gone = False
        return gone

    def remove_stale(self, keep: set[str], min_age_seconds: float = 60.0) -> list[str]:
        """Remove the empty worker groups not in `keep` (workers this engine watches) that are
        older than `min_age_seconds` (another engine on this host may have just made one for a
        worker it is starting). A group with processes is never removed (rmdir refuses)."""
        import time

        removed = []
        now = time.time()
        for name in sorted(self.existing() - keep):
            groups = list(self.groups(name).values())
            try:
                if min(os.stat(group).st_mtime for group in groups if group.exists()) > now - min_age_seconds:
                    continue
            except (OSError, ValueError):
                continue
            if self.remove(name):
                removed.append(name)
        return removed

    def existing(self) -> set[str]:
        """Names of the worker groups that exist now (for gc)."""
        found: set[str] = set()
        for base in self.bases.values():
            with contextlib.suppress(FileNotFoundError):
                found.update(entry.name for entry in os.scandir(base) if entry.is_dir())
        return found


def _in_group(pid: int, worker_id: str) -> bool:
    """Whether the process holding `pid` is in a group named after the worker."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return any(line.rsplit("/", 1)[-1] == worker_id for line in text.splitlines())


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        if optional:
            return
        raise
    try:
        os.write(fd, value.encode())
    except OSError:
        if not optional:
            raise
    finally:
        os.close(fd)


def _counter(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (FileNotFoundError, ValueError):
        pass
    return 0


def _int(path: Path, unit: int) -> int | None:
    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(raw) // unit if raw.isdigit() else None


def host_available_mb(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's available memory (`MemAvailable` of /proc/meminfo) in MiB."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return None


def own_cgroups(text: str) -> dict[str, str]:
    """Controller -> path of this process's groups, from /proc/self/cgroup ("" = the v2 one)."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def detect(root: Path = ROOT, self_cgroup: str | None = None) -> Cgroups:
    """Which cgroup version this host can limit workers with, and the parent groups to use."""
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError as exc:
            return Cgroups("none", {}, f"cannot read /proc/self/cgroup: {exc}")
    own = own_cgroups(self_cgroup)
    try:
        if (root / "cgroup.controllers").exists():
            return _detect_v2(root, own.get("", "/"))
        if (root / "memory").is_dir() and (root / "pids").is_dir():
            return _detect_v1(root, own)
    except OSError as exc:
        return Cgroups("none", {}, f"cgroups not writable: {exc}")
    return Cgroups("none", {}, f"no cgroup v2 hierarchy with controllers and no v1 memory/pids under {root}")


def _detect_v1(root: Path, own: dict[str, str]) -> Cgroups:
    bases: dict[str, Path] = {}
    # Only the two controllers limits need: each group is a mkdir and a write on every start.
    for controller in ("memory", "pids"):
        base = root / controller / own.get(controller, "/").lstrip("/") / PARENT_NAME
        base.mkdir(exist_ok=True)
        bases[controller] = base
    return Cgroups("v1", bases)


def _detect_v2(root: Path, own_path: str) -> Cgroups:
    controllers = (root / "cgroup.controllers").read_text().split()
    if "memory" not in controllers or "pids" not in controllers:
        return Cgroups("none", {}, f"cgroup v2 at {root} lacks the memory or pids controller")
    # A v2 group with processes cannot hand controllers to children ("no internal processes"):
    # the workers' parent sits beside the server's group when the server's has processes.
    own = root / own_path.lstrip("/")
    parent = own if own == root else own.parent
    base = parent / PARENT_NAME
    base.mkdir(exist_ok=True)
    wanted = " ".join(f"+{c}" for c in ("memory", "pids", "cpu") if c in controllers)
    for group in (parent, base):
        _write(group / "cgroup.subtree_control", wanted)
    return Cgroups("v2", {"": base})


@dataclass(frozen=True)
class Capacity:
    """What memory-aware admission sees on this host: available memory, what running workers'
    limits reserve (their cgroups, whichever engine on the host started them) and the headroom."""

    host: str
    available_mb: int | None
    reserved_mb: int | None
    workers: int | None
    headroom_mb: int

    @property
    def free_mb(self) -> int | None:
        """MiB a new worker's limit may still take (what admission compares against)."""
        if self.available_mb is None:
            return None
        return self.available_mb - (self.reserved_mb or 0) - self.headroom_mb


def reserved(groups: Cgroups) -> tuple[int, int]:
    """(MiB of memory limits, number) of the worker groups on this host that hold processes:
    an ended worker's empty group and the parked wrappers' groups reserve nothing."""
    total = count = 0
    pids_controller = "" if groups.version == "v2" else "pids"
    for name in groups.existing():
        if name.startswith(POOL_PREFIX):
            continue
        group = groups.groups(name)
        with contextlib.suppress(OSError, KeyError):
            if not _int(group[pids_controller] / "pids.current", 1):
                continue
            memory, _ = groups.limit_of(name)
            if memory is not None and memory < UNLIMITED_MB:
                total, count = total + memory, count + 1
    return total, count


UNLIMITED_MB = 1 << 40  # a v1 group without a limit reads 2^63 bytes


@functools.cache
def this_host() -> Cgroups:
    """The groups as this process finds them, detected once (API processes that report capacity)."""
    return detect()


def capacity(meminfo: Path, headroom_mb: int, groups: Cgroups | None) -> Capacity:
    used, count = reserved(groups) if groups is not None and groups.usable else (None, None)
    return Capacity(socket.gethostname(), host_available_mb(meminfo), used, count, headroom_mb)
