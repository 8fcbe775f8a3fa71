"""How a worker's end on its node can go wrong: the push of its branch, retried, and a full disk.

The push is retried: the git remote may be away for a moment (a
restart, a network blip) exactly when a worker ends, and a push given up at once leaves the
worker's work stranded on its node. Only the remote's failures are retried (RemoteError: the
transport, or the remote refusing); a local failure (a full disk, a broken worktree) would fail
the same way again. The attempts are bounded, so a worker's end never waits without limit, and
each attempt is the whole commit-and-push: committing again finds the same tree and makes no
new commit, so a retry pushes the same commit.

A node disk that filled up while the worker ran (its output, its files, its commit could not be
written) ends the worker FAILED saying so, as a cgroup limit does, not with whatever the agent
made of its failed writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.workspaces.remote import RemoteError

ATTEMPTS = 5
FIRST_BACKOFF_SECONDS = 1.0  # doubled after each failed attempt
T = TypeVar("T")


class PushFailed(RemoteError):
    """Every attempt failed; the message is the last attempt's, with how many were made."""


def retried(push: Callable[[], T], give_up: Callable[[], bool] = lambda: False) -> T:
    """`push()`, tried again after a RemoteError with a doubling pause, at most ATTEMPTS times
    (fewer once `give_up()` says the result is no longer wanted)."""
    pause = FIRST_BACKOFF_SECONDS
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return push()
        except RemoteError as exc:
            if attempt == ATTEMPTS or give_up():
                raise PushFailed(f"{exc} (gave up after {attempt} attempts)") from None
        time.sleep(pause)
        pause *= 2
    raise AssertionError("unreachable")


def disk_full(node: str, directory: Path, pushed: dict[str, Any]) -> str | None:
    """The reason for a worker that ended with its node's disk full (or its push failing for
    want of space), None otherwise."""
    try:
        full = os.statvfs(directory).f_bavail == 0
    except OSError:
        full = False
    if full or "No space left on device" in str(pushed.get("push_error") or ""):
        return f"no space left on device in {directory} on node {node}"
    return None
