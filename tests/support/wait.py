"""Poll a condition instead of sleeping for a guessed time.

A deadline is only how long to wait before calling the condition a failure, never a claim about
speed: the suite must hold with both cores busy with other work, where a one-second step can take
twenty. So no deadline is shorter than MIN_DEADLINE_SECONDS (a test that must show something is
event-driven makes the alternative slower than that instead, e.g. a poll interval of 600 s), and
a passing test is not slowed down by it: the wait ends as soon as the condition holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


MIN_DEADLINE_SECONDS = 60.0


def wait_until(
    predicate: Callable[[], T], timeout: float = MIN_DEADLINE_SECONDS, interval: float = 0.05, what: str = ""
) -> T:
    """Return the first truthy value of `predicate()`; fail the test if none comes within `timeout`
    (at least MIN_DEADLINE_SECONDS)."""
    timeout = max(timeout, MIN_DEADLINE_SECONDS)
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate!r}; last: {last!r}"
            )
        time.sleep(interval)
        last = predicate()
    return last
