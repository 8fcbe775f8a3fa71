"""SQLite's one writer at a time, queued across processes instead of polled for.

Within a process, units of work wait on an asyncio lock. Between processes (`--workers N`, a
separate `orchestrator engine`) they used to meet at SQLite's own lock, where a writer that finds
it taken sleeps in the busy handler (1, 2, 5 ... up to 100 ms a try) and is not told when the
lock frees: under load most of a write's latency was that sleeping. Here each process also takes
an exclusive `flock` on a file beside the database before it begins: a waiter blocks in the
kernel (in a thread, never the event loop) and wakes the moment the holder lets go. The kernel
drops the lock of a process that dies, kill -9 included.

Writers that do not take this lock (the CLI's, another tool's) still meet SQLite's own lock and
its busy timeout, as before: the file lock orders the processes that take it, it excludes no one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator


class FileWriteLock:
    """An exclusive flock on `<database>.write-lock`, per Database (flock locks belong to the open
    file, so two Database objects of one process exclude each other too)."""

    def __init__(self, database_path: str) -> None:
        self.path = f"{database_path}.write-lock"
        self._fd: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        fd = self._descriptor()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await _wait_for(fd)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def _wait_for(fd: int) -> None:
    """Block in a thread until the lock is ours. If the waiting task is cancelled meanwhile, the
    thread still gets the lock eventually: it is let go at once, or no writer would ever run again."""
    waiting = asyncio.get_running_loop().run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
    try:
        await asyncio.shield(waiting)
    except asyncio.CancelledError:
        waiting.add_done_callback(lambda done: _release_if_taken(fd, done))
        raise


def _release_if_taken(fd: int, done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is None:
        fcntl.flock(fd, fcntl.LOCK_UN)
