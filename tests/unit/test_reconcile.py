"""Reconciling an adopted worker's process with its recorded status, with real processes: the
process group's real state is read from /proc, and only a disagreement is signalled."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.agents.base import LaunchSpec
from orchestrator.engine.reconcile import Reconciler
from orchestrator.executors.local import LocalExecutor, WorkerProcess
from orchestrator.executors.processes import stopped_process_groups
from tests.support.wait import wait_until


def group_states(pgid: int) -> list[str]:
    states = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                states.append(fields[0])
    return states


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[LocalExecutor, WorkerProcess]]:
    """A wrapper whose agent has a child of its own: a group of three processes."""
    executor = LocalExecutor()
    (tmp_path / "work").mkdir()
    proc = executor.start(
        "w_reconcile001",
        LaunchSpec(argv=["sh", "-c", "sleep 60 & wait"]),
        tmp_path / "work",
        tmp_path / "run",
    )
    wait_until(lambda: len(group_states(proc.pid)) == 3, timeout=30, what="the worker's group")
    try:
        yield executor, proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        executor.wait(proc, timeout=30)


def test_a_stopped_group_is_seen_and_a_lost_resume_gets_its_sigcont(
    worker: tuple[LocalExecutor, WorkerProcess],
) -> None:
    executor, proc = worker
    assert proc.pid not in stopped_process_groups()
    os.killpg(proc.pid, signal.SIGSTOP)
    wait_until(lambda: set(group_states(proc.pid)) == {"T"}, timeout=30, what="the group stopped")
    assert proc.pid in stopped_process_groups()

    done = Reconciler(executor).reconcile(proc, "RUNNING")
    assert done is not None and "SIGCONT" in done
    assert proc.applied_paused is False
    wait_until(lambda: "T" not in group_states(proc.pid), timeout=30, what="the group running again")


def test_a_lost_pause_gets_its_sigstop_and_agreement_sends_nothing(
    worker: tuple[LocalExecutor, WorkerProcess],
) -> None:
    executor, proc = worker
    assert Reconciler(executor).reconcile(proc, "RUNNING") is None  # agrees: nothing sent
    assert proc.applied_paused is False
    done = Reconciler(executor).reconcile(proc, "PAUSED")
    assert done is not None and "SIGSTOP" in done and proc.applied_paused
    wait_until(lambda: set(group_states(proc.pid)) == {"T"}, timeout=30, what="the group stopped")
    assert Reconciler(executor).reconcile(proc, "PAUSED") is None  # agrees now
    assert proc.applied_paused  # control knows it is stopped: a later resume sends SIGCONT
    terminated = Reconciler(executor).reconcile(proc, "TERMINATED")
    assert terminated is not None and "control stops it" in terminated
    assert set(group_states(proc.pid)) == {"T"}  # a stop is control's: SIGTERM + SIGCONT
