"""Blocked passes (engine.py `_space_blocked_pass`): while jobs queue behind a full quota, wake-ups
from other commits (every submit) are answered at most once per BLOCKED_PASS_GAP_SECONDS, and one
of the engine's own workers ending is answered at once (its slot is what the queue waits for)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

from orchestrator.engine.supervision import BLOCKED_PASS_GAP_SECONDS
from tests.unit.engine.conftest import Harness, schedule_and_launch, wait_for


async def test_the_scheduler_says_blocked_only_when_jobs_wait_at_a_full_depth(harness: Harness) -> None:
    scheduler = harness.engine.scheduler
    first = [await harness.submit(agent="sleep") for _ in range(2)]  # the depth-0 quota is 2
    await schedule_and_launch(harness)
    assert not scheduler.blocked  # it started both
    assert not await harness.in_session(scheduler.schedule)
    assert not scheduler.blocked  # the quota is full, but nothing waits behind it
    queued = await harness.submit(agent="sleep")
    assert not await harness.in_session(scheduler.schedule)
    assert scheduler.blocked
    assert first and queued


async def test_blocked_passes_are_spaced_and_an_own_exit_is_answered_at_once(harness: Harness) -> None:
    engine = harness.engine
    for _ in range(2):
        await harness.submit(agent="sleep")
    launched = await schedule_and_launch(harness)
    queued = await harness.submit(agent="sleep")
    ticks: list[float] = []
    real_tick = engine.tick

    async def counted_tick() -> None:
        await real_tick()
        ticks.append(time.monotonic())

    engine.tick = counted_tick  # type: ignore[method-assign]  # the real pass, counted
    loop = asyncio.create_task(engine._main_loop())
    try:
        await wait_for(lambda: engine.scheduler.blocked and bool(ticks), "a blocked pass")
        # Commits elsewhere (each submit's) wake the engine, far more often than the gap.
        first_wake = time.monotonic()
        before = len(ticks)
        for _ in range(200):
            engine.wake.set()
            await asyncio.sleep(0.001)
        elapsed = time.monotonic() - first_wake
        spaced = len(ticks) - before
        assert spaced <= elapsed / BLOCKED_PASS_GAP_SECONDS + 2, (spaced, elapsed)
        blocked_gaps = [b - a for a, b in zip(ticks[before:], ticks[before + 1 :], strict=False)]
        assert all(gap >= BLOCKED_PASS_GAP_SECONDS * 0.9 for gap in blocked_gaps), blocked_gaps

        # One of its own workers ends: the queued job starts without waiting for a poll.
        engine.executor.send(launched[0].spawned.proc, signal.SIGKILL)  # type: ignore[union-attr]
        await wait_for(
            lambda: any(record.job_id == queued for record in engine.sup.live.values()),
            "the queued job to start after the exit",
        )
    finally:
        engine.stopping = True
        engine.wake.set()
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
