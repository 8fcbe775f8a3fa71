"""The node's push retry and its full-disk reason (executors/ray_push.py), without a cluster:
the Ray tests (tests/ray/test_ray_node_failures.py) push to a real remote that refuses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.executors import ray_push
from orchestrator.workspaces.remote import RemoteError


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_push, "FIRST_BACKOFF_SECONDS", 0.0)


def failing(times: int, calls: list[int]) -> Callable[[], str]:
    def push() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise RemoteError(f"refused {len(calls)}")
        return "commit"

    return push


def test_a_push_refused_for_a_while_is_retried_until_it_is_taken() -> None:
    calls: list[int] = []
    assert ray_push.retried(failing(ray_push.ATTEMPTS - 1, calls)) == "commit"
    assert len(calls) == ray_push.ATTEMPTS


def test_a_push_always_refused_gives_up_after_the_attempts_with_the_last_reason() -> None:
    calls: list[int] = []
    with pytest.raises(RemoteError, match=rf"refused 5 \(gave up after {ray_push.ATTEMPTS} attempts\)"):
        ray_push.retried(failing(1000, calls))
    assert len(calls) == ray_push.ATTEMPTS


def test_a_push_no_longer_wanted_stops_at_once_and_local_failures_are_not_retried() -> None:
    calls: list[int] = []
    with pytest.raises(RemoteError, match="gave up after 1 attempts"):
        ray_push.retried(failing(1000, calls), give_up=lambda: True)
    assert len(calls) == 1

    def local() -> str:
        calls.append(1)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ray_push.retried(local)
    assert len(calls) == 2


def test_a_full_disk_is_named_from_the_push_error(tmp_path: Path) -> None:
    assert ray_push.disk_full("n1", tmp_path, {"push_error": None}) is None
    full = {"push_error": "on node n1: [Errno 28] No space left on device"}
    assert ray_push.disk_full("n1", tmp_path, full) == f"no space left on device in {tmp_path} on node n1"
