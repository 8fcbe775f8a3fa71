"""One working engine among the API processes of one host that share a database.

`uvicorn --workers N` starts N processes, and each used to run an engine: every commit woke all N,
each ran a pass that (at a full quota) found nothing to start, and N engines on one host contended
for the same cores for nothing (issue 19: 4 processes submitted slower than 1). Now every process
with ORCHESTRATOR_ENGINE=true is ready to run the engine, and exactly one per host and database
does: the one holding an exclusive `flock` on the database's engine lock file. The others stand
by, blocked on that lock in a thread; the kernel frees it the moment the holder's process ends
(kill -9 included), and a standby starts its engine, whose recovery takes over the dead engine's
jobs and adopts its workers (their PID files), never starting them twice.

The lock file is keyed by the database's identity, so every server on this host sharing it takes
part, whatever its data dir:
* SQLite: `<database file>.engine-lock`, beside the database (its real path).
* PostgreSQL: `<runtime dir>/engine-<sha256 of host:port/dbname>.lock`, in a private directory of
  the server's user: `/run/orchestrator` for root, else `$XDG_RUNTIME_DIR/orchestrator`, else
  `<tmp>/orchestrator-<uid>`. Servers of different users do not coordinate (each runs an engine),
  nor do URLs that name the same server differently (`localhost` and `127.0.0.1`).
Standalone `orchestrator engine` processes never take the lock: several engines per host stay
possible by explicit choice. Workers never see the lock: the descriptor is close-on-exec, and a
sandboxed worker's /tmp and /run are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import make_url

log = logging.getLogger("orchestrator")

# How long a shutdown waits for an engine start already under way before stopping it.
START_WAIT_SECONDS = 60.0


class Stoppable(Protocol):
    async def stop(self) -> None: ...


def runtime_dir() -> Path:
    """A directory only this user can use, the same for every server of this user on this host."""
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return Path("/run/orchestrator")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "orchestrator"
    return Path(tempfile.gettempdir()) / f"orchestrator-{os.geteuid()}"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    # In a shared /tmp another user could have made it first: a directory they own or can write
    # to is not ours to trust with the lock (they could hold it and keep every engine standing by).
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PermissionError(f"{path} is not a private directory of this user")
    return path


def lock_path(database_url: str) -> Path:
    """The engine lock file of this database on this host."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            return Path(f"{os.path.realpath(database)}.engine-lock")
    identity = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return _private_dir(runtime_dir()) / f"engine-{digest}.lock"


class EngineSeat:
    """This process's place in the line for the engine: `run()` waits for the lock, then starts the
    engine with `start` and keeps it until `close()`, which stops it and lets the lock go at once,
    so a standby takes over promptly on a graceful stop too."""

    def __init__(self, path: Path, start: Callable[[], Awaitable[Stoppable]]) -> None:
        self.path = path
        self._start = start
        self._fd: int | None = None
        self._closing = False
        self.engine: Stoppable | None = None
        self.starting: asyncio.Task[Stoppable] | None = None

    @property
    def state(self) -> str:
        """`running` (this process runs the engine) or `standby` (another process on this host does)."""
        return "running" if self.engine is not None else "standby"

    async def run(self) -> None:
        fd = await self._acquire()
        if self._closing:
            os.close(fd)
            return
        self._fd = fd
        log.info("this process (pid %s) runs the engine (lock %s)", os.getpid(), self.path)
        self.starting = asyncio.ensure_future(self._start())
        # Shielded: a shutdown during the start waits for it (close), then stops what it started.
        self.engine = await asyncio.shield(self.starting)

    async def _acquire(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except BaseException:
            os.close(fd)
            raise
        log.info("standing by: another process on this host runs the engine (lock %s)", self.path)
        loop = asyncio.get_running_loop()
        got: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if got.done():  # given up (shutdown): nobody will use the lock, let it go
                with contextlib.suppress(OSError):
                    os.close(fd)
            elif error is not None:
                got.set_exception(error)
            else:
                got.set_result(None)

        def wait() -> None:  # a daemon thread: it never holds up the process's exit
            error: BaseException | None = None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:  # the loop is closed: the process is ending
                with contextlib.suppress(OSError):
                    os.close(fd)

        threading.Thread(target=wait, name="engine-standby", daemon=True).start()
        await got
        return fd

    async def close(self) -> None:
        self._closing = True
        starting = self.starting
        if starting is not None and not starting.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(starting), START_WAIT_SECONDS)
        engine = self.engine
        if engine is None and starting is not None and starting.done() and not starting.cancelled():
            engine = None if starting.exception() is not None else starting.result()
        self.engine = None
        try:
            if engine is not None:
                await engine.stop()
        finally:
            if self._fd is not None:
                os.close(self._fd)  # the lock goes with it: a standby starts its engine now
                self._fd = None
