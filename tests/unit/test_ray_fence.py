"""The fence a Ray node starts beside each worker (executors/ray_node.py), run as it runs there:
a shell given the actor's, the raylet's and the worker's process group's PIDs. Real processes
stand in for the three (a fence only reads /proc and signals)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.executors.ray_node import FENCE_SCRIPT
from tests.support.wait import wait_until


def live_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live (not zombie) process."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                yield int(name), int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list[int]:
    return [pid for pid, _, group in live_processes() if group == pgid]


def children_of(parent: int) -> list[int]:
    return [pid for pid, ppid, _ in live_processes() if ppid == parent]


@pytest.fixture
def stand_ins() -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """An actor and a raylet: processes that live until killed."""
    actor = subprocess.Popen(["sleep", "600"])
    raylet = subprocess.Popen(["sleep", "600"])
    try:
        yield actor, raylet
    finally:
        for proc in (actor, raylet):
            proc.kill()
            proc.wait()


def wrapper(script: str) -> subprocess.Popen[bytes]:
    """A worker's wrapper leading a process group of its own, ended and reaped (as the actor
    reaps it) before the test goes on."""
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    proc.wait()
    return proc


def fence(actor: int, raylet: int, group: int) -> subprocess.Popen[bytes]:
    argv = ["/bin/sh", "-c", FENCE_SCRIPT, "orchestrator-fence", str(actor), str(raylet), str(group)]
    return subprocess.Popen(argv, start_new_session=True)


def test_a_member_the_ended_wrapper_left_behind_dies_with_the_actor(
    stand_ins: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]],
) -> None:
    actor, raylet = stand_ins
    ended = wrapper("(trap '' TERM; exec sleep 600) & exit 0")
    assert len(wait_until(lambda: group_members(ended.pid), timeout=30, what="the member left behind")) == 1
    watching = fence(actor.pid, raylet.pid, ended.pid)
    try:
        # Watching: it found the group alive and sleeps before it looks again.
        wait_until(lambda: children_of(watching.pid), timeout=30, what="the fence watching the group")
        assert group_members(ended.pid)
        actor.kill()  # the actor dies (kill -9, say the OOM killer): no engine will `finish` it
        actor.wait()
        wait_until(lambda: not group_members(ended.pid), timeout=60, what="the group killed")
        assert watching.wait(timeout=60) == 0
        assert raylet.poll() is None
    finally:
        watching.kill()
        watching.wait()
        if group_members(ended.pid):
            os.killpg(ended.pid, 9)


def test_a_group_that_empties_ends_the_fence_and_nothing_else(
    stand_ins: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]],
) -> None:
    actor, raylet = stand_ins
    ended = wrapper("exit 0")
    watching = fence(actor.pid, raylet.pid, ended.pid)
    try:
        assert watching.wait(timeout=60) == 0
        assert actor.poll() is None and raylet.poll() is None
    finally:
        watching.kill()
        watching.wait()
