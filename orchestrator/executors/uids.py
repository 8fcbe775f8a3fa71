"""A host uid per live sandboxed worker, leased from a range, exactly once across every engine
(and Ray node, and test server) on the host.

A lease is an exclusive `flock` on `<LEASE_DIR>/<uid>`. The engine takes it, then hands the
open file to the worker's wrapper as descriptor `LEASE_FD` (a parked wrapper gets it when it is
parked) and closes its own copy: the lock belongs to that open file, so it is held exactly as
long as the wrapper lives, through a `kill -9` of the engine and a re-adoption by another one,
and the kernel drops it when the wrapper ends. No stale lease is left to clean up: a uid whose
wrapper is gone is free, whoever started it. The wrapper closes the descriptor for the agent:
a process that held it could unlock it (`flock -u`) and hand its uid to a second worker.

What a worker leaves where the next holder of its uid could see it: its worktree, HOME and
/tmp are its own, but a profile's `rw_binds` are shared. The engine records them in the lease
file when it gives the uid to a worker; whoever next takes the uid first hands everything that
uid owns there to root (`sweep`), modes kept but never group/other-writable, so nothing a
worker left behind is readable (with the agent's umask 077) or writable by a later one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Host-wide (every engine, Ray node and test server on the host), and on disk, not under /run: the
# records of what to sweep must outlive a reboot, or a uid's leftovers would be its next holder's.
LEASE_DIR = Path("/var/lib/orchestrator/uids")
LEASE_FD = 8  # the wrapper's descriptor holding its uid's lease (closed for the agent)
MAX_RECORD_BYTES = 64 * 1024
MAX_DEPTH = 64  # directory levels a sweep descends (one descriptor each)
GONE = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)  # an entry replaced or removed while it is swept


class NoFreeUid(RuntimeError):
    """Every uid of the range is leased to a live worker (or a parked wrapper)."""


@dataclass
class Lease:
    uid: int
    fd: int  # the locked lease file (close-on-exec); -1 once this process closed its copy

    def assign(self, rw_binds: Iterable[str]) -> None:
        """Record the shared writable paths the worker gets: the next holder sweeps them."""
        data = json.dumps({"rw_binds": sorted(set(rw_binds))}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def close(self) -> None:
        """Drop this process's copy (the wrapper's copy keeps the lease)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class UidRange:
    """Leases uids `base … base + count - 1`. Each process starts at a random point and walks
    the range round-robin, so a uid just released is taken again only after the others."""

    def __init__(self, base: int, count: int, directory: Path | None = None) -> None:
        self.base, self.count = base, count
        self.directory = directory or LEASE_DIR
        self._next = random.randrange(count)
        self._lock = threading.Lock()

    def lease(self) -> Lease:
        """A uid no live worker on this host holds, its leftovers swept; NoFreeUid if none."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for _ in range(self.count):
            with self._lock:
                offset, self._next = self._next, (self._next + 1) % self.count
            lease = try_lease(self.directory, self.base + offset)
            if lease is not None:
                return lease
        raise NoFreeUid(
            f"no free sandbox uid: all {self.count} of {self.base}-{self.base + self.count - 1} are in use"
        )


def try_lease(directory: Path, uid: int) -> Lease | None:
    """The lease of `uid` if nobody holds it (after sweeping what its last holder left)."""
    path = directory / str(uid)
    opened = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:  # above the descriptors a spawn sets up (0-3, LEASE_FD): none of them can overwrite it
        fd = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, LEASE_FD + 2)
    finally:
        os.close(opened)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            raise BlockingIOError  # removed (`forget`) since it was opened: a new file is the lease
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    try:
        record = os.pread(fd, MAX_RECORD_BYTES, 0)
        if record:
            for bind in json.loads(record)["rw_binds"]:
                sweep(Path(bind), uid)
            os.ftruncate(fd, 0)
    except Exception as exc:  # not swept: the uid stays unused, the next one is tried
        log.warning("uid %d is not leased: its leftovers could not be swept: %r", uid, exc)
        os.close(fd)
        return None
    return Lease(uid, fd)


def held(directory: Path, uid: int) -> bool:
    """Whether some process holds `uid`'s lease (tests, diagnostics)."""
    try:
        fd = os.open(directory / str(uid), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def forget(directory: Path, uids: Iterable[int]) -> None:
    """Remove the lease files of uids nobody holds (tests and benchmarks with ranges of their
    own; a file that is held stays: a new one in its place would be a second lease)."""
    for uid in uids:
        path = directory / str(uid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()  # still locked by us: nobody can lease it meanwhile
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def sweep(top: Path, uid: int) -> None:
    """Hand everything `uid` owns under `top` (not `top` itself, the operator's) to root, and
    take group/other write (and set-id) bits off it. Through directory descriptors opened with
    O_NOFOLLOW: a worker that swaps a directory for a symlink meanwhile cannot point this at a
    host file. A directory others cannot traverse once swept is not descended: nothing in it is
    reachable by a worker any more. Depth first, one descriptor per level; a directory of the
    uid's deeper than MAX_DEPTH is sealed (root's, 0700) instead. An error other than an entry
    that went away raises: the caller does not lease a uid whose leftovers may be left."""
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # the operator removed it: nothing left there
    stack: list[tuple[int, Iterator[str]]] = []
    try:
        stack.append((fd, iter(os.listdir(fd))))
        while stack:
            dir_fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(stack.pop()[0])
                continue
            child = _sweep_entry(dir_fd, name, uid, seal=len(stack) >= MAX_DEPTH)
            if child is not None:
                try:
                    stack.append((child, iter(os.listdir(child))))
                except OSError:
                    os.close(child)
                    raise
    except BaseException:
        for dir_fd, _ in stack:
            os.close(dir_fd)
        if not stack:
            os.close(fd)
        raise


def _sweep_entry(dir_fd: int, name: str, uid: int, *, seal: bool) -> int | None:
    """Sweep one entry; a directory to descend is returned open."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            if info.st_uid == uid:  # a symlink, socket or FIFO: no content, only its owner
                os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        fd = os.open(name, flags | (os.O_DIRECTORY if stat.S_ISDIR(info.st_mode) else 0), dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in GONE:
            return None  # replaced or removed meanwhile (a symlink now: O_NOFOLLOW refused it)
        raise
    info = os.fstat(fd)
    is_dir = stat.S_ISDIR(info.st_mode)
    mode = stat.S_IMODE(info.st_mode) & 0o1755
    if info.st_uid == uid:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700 if is_dir and seal else mode)
    if is_dir and mode & 0o001 and not seal:
        return fd
    if is_dir and seal and info.st_uid != uid and mode & 0o001:
        log.warning("sweep for uid %d: not descending below depth %d", uid, MAX_DEPTH)
    os.close(fd)
    return None
