"""A node's push of a worker's branch, retried: the git remote may be away for a moment (a
restart, a network blip) exactly when a worker ends, and a push given up at once leaves the
worker's work stranded on its node. Only the remote's failures are retried (RemoteError: the
transport, or the remote refusing); a local failure (a full disk, a broken worktree) would fail
the same way again. The attempts are bounded, so a worker's end never waits without limit, and
each attempt is the whole commit-and-push: committing again finds the same tree and makes no
new commit, so a retry pushes the same commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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
