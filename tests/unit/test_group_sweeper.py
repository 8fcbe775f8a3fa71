"""Ended workers' cgroups removed off the engine's pass (executors/sweeper.py), with this host's
real cgroups and real processes: an engine's executor hands them over and they go; a group that
is still busy is retried; a worker of the same name that starts again keeps its groups."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors import cgroups, sandbox
from orchestrator.executors.cgroups import Limits
from orchestrator.executors.local import LocalExecutor
from orchestrator.executors.sweeper import GroupSweeper
from tests.support.wait import wait_until

GROUPS = cgroups.detect()
pytestmark = pytest.mark.skipif(
    not GROUPS.usable or shutil.which("bwrap") is None,
    reason="needs writable cgroups and bwrap (this project's test hosts)",
)


def _name(label: str) -> str:
    return f"w_sweep_{label}_{uuid.uuid4().hex[:8]}"


def _exists(name: str) -> bool:
    return any(group.exists() for group in GROUPS.groups(name).values())


@contextlib.contextmanager
def _busy_group(name: str) -> Iterator[subprocess.Popen[bytes]]:
    """`name`'s groups with a live process in them (rmdir refuses them until it ends)."""
    procs_files = GROUPS.create(name, Limits(64, 16))
    holder = subprocess.Popen(["sleep", "600"])
    try:
        for procs in procs_files:
            procs.write_text(str(holder.pid))
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_busy_group_is_retried_and_goes_once_its_last_process_has() -> None:
    sweeper = GroupSweeper(GROUPS)
    name = _name("busy")
    try:
        with _busy_group(name):
            sweeper.remove_later(name)
            other = _name("other")
            GROUPS.create(other, Limits(64, 16))
            sweeper.remove_later(other)
            # A pass has tried both: the empty one went, the busy one waits for its process.
            wait_until(lambda: not _exists(other), timeout=30)
            assert _exists(name)
            assert not sweeper.wait_idle(0)
        assert sweeper.wait_idle(30)
        assert not _exists(name)
    finally:
        sweeper.close()
        GROUPS.remove(name)


def test_a_name_taken_back_is_not_removed_after_its_groups_empty() -> None:
    """What `LocalExecutor.start` does for a worker that starts again under its name: once
    cancelled, its groups are left alone, also by sweeps that run after they became empty."""
    sweeper = GroupSweeper(GROUPS)
    name = _name("again")
    try:
        with _busy_group(name):
            sweeper.remove_later(name)
            sweeper.cancel(name)
        # The group is empty now; a sweep that certainly ran after that (it removed `later`):
        later = _name("later")
        GROUPS.create(later, Limits(64, 16))
        sweeper.remove_later(later)
        assert sweeper.wait_idle(30)
        assert not _exists(later)
        assert _exists(name)
    finally:
        sweeper.close()
        GROUPS.remove(name)


def test_an_engines_executor_removes_an_ended_workers_groups_in_the_background(tmp_path: Path) -> None:
    host = sandbox.detect(tmp_path / "data")
    assert host.usable, host.problem
    ex = LocalExecutor(host, GROUPS, pool_size=0, sweep_in_background=True)
    assert ex.sweeper is not None
    name = _name("ended")
    work, run = tmp_path / "work", tmp_path / "run"
    home = run / "home"
    home.mkdir(parents=True)
    work.mkdir()
    sandbox.give_to_agent(host, work, home)
    try:
        spec = LaunchSpec(argv=["/bin/sh", "-c", "exit 0"])
        proc = ex.start(name, spec, work, run, sandbox=sandbox.SandboxSpec(work, home), limits=Limits(64, 16))
        assert ex.wait(proc, 60) == 0
        assert ex.ending(name) is None
        assert ex.sweeper.wait_idle(30)
        assert not _exists(name)
    finally:
        ex.close()
        GROUPS.remove(name)
