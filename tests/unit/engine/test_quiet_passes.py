"""Quiet passes (engine.py `_quiet_pass`): after a blocked pass that held no IDLE worker back, a
pass woken by another commit (a submit queued behind the full quota) reads only the pass state
(queries/state.py) while it is unchanged: no transaction, no scheduling. Control still acts on
the statuses it read, and a slot coming back (the engine's own worker ending) brings a full pass
that starts the queued job."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import WorkerStatus
from orchestrator.db.models import ResourcePool
from orchestrator.db.transitions import transition_worker
from orchestrator.engine.launcher import Launched
from orchestrator.engine.scheduler import Ready
from orchestrator.engine.slots import SlotMoves
from tests.unit.engine.conftest import Harness, close_harness, open_harness, settings_for, wait_for
from tests.unit.engine.test_control import process_state


@pytest.fixture
async def quiet(tmp_path: Path, database_url: str) -> AsyncIterator[Harness]:
    # A long poll interval: the full pass it forces would hide what this tests (a deadline for
    # the fallback, never a duration the test waits).
    h = await open_harness(settings_for(tmp_path, database_url, orchestrator_poll_seconds=600))
    try:
        yield h
    finally:
        await close_harness(h)


def count_full_passes(h: Harness) -> list[int]:
    """Calls of the scheduler (every full pass makes one), counted; the real scheduler runs."""
    calls: list[int] = []
    real = h.engine.scheduler.schedule

    async def counted(session: AsyncSession, moves: SlotMoves | None = None) -> Ready:
        calls.append(1)
        return await real(session, moves)

    h.engine.scheduler.schedule = counted  # type: ignore[method-assign]
    return calls


async def _blocked(h: Harness) -> list[Launched]:
    engine = h.engine
    for _ in range(2):  # the depth-0 quota is 2
        await h.submit(agent="sleep")
    await engine.tick()  # claims both and starts them
    launched = list(engine.unrecorded)
    await engine.tick()  # records the starts
    await h.submit(agent="sleep")  # queued behind the full quota
    await engine.tick()
    assert engine.scheduler.blocked and engine.scheduler.blocked_fingerprint is not None
    return launched


async def test_passes_after_a_blocked_one_only_read_until_a_slot_comes_back(quiet: Harness) -> None:
    engine = quiet.engine
    launched = await _blocked(quiet)
    full = count_full_passes(quiet)
    queued = await quiet.submit(agent="sleep")  # another commit that wakes the engine
    for _ in range(3):
        await engine.tick()
    assert full == []  # nothing could start: no pass scheduled

    # Control still follows the database in a quiet pass: a pause reaches the process.
    proc = launched[0].spawned.proc  # type: ignore[union-attr]
    await wait_for(lambda: process_state(proc.pid) in ("S", "R"), "the worker to run")

    async def pause(session: AsyncSession) -> None:
        await transition_worker(
            session, launched[0].worker.id, WorkerStatus.PAUSED, actor="user:unit", reason="unit"
        )

    await quiet.in_session(pause)
    await engine.tick()
    assert full == []
    await wait_for(lambda: process_state(proc.pid) == "T", "the paused worker to be stopped (SIGSTOP)")

    # One of its workers ends: its slot comes back, a full pass starts a queued job.
    engine.executor.send(launched[1].spawned.proc, signal.SIGKILL)  # type: ignore[union-attr]
    await wait_for(lambda: bool(engine.sup.exited), "the engine to see its worker end")
    await engine.tick()
    assert full == [1]
    assert not engine.scheduler.blocked
    assert len(engine.unrecorded) == 1  # the first job queued behind the quota
    assert queued not in {item.job.id for item in engine.unrecorded}


async def test_a_slot_another_process_returns_ends_the_quiet_passes(quiet: Harness) -> None:
    """What a quiet pass reads changed (a pool's free slots: a peer engine, an API allocation
    given back): the pass runs in full."""
    engine = quiet.engine
    await _blocked(quiet)
    full = count_full_passes(quiet)
    await engine.tick()
    assert full == []

    async def enlarge_pool(session: AsyncSession) -> None:
        await session.execute(update(ResourcePool).where(ResourcePool.depth == 0).values(max_workers=3))

    await quiet.in_session(enlarge_pool)
    await engine.tick()
    assert full == [1]
    assert len(engine.unrecorded) == 1  # the queued job started
