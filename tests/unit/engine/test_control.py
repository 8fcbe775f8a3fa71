"""Control alone: the processes of supervised workers follow the statuses the database holds
(pause, resume, terminate), and workers that must end are stopped in the database (timeout, a
job ended under them)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.core.states import JobStatus, WorkerStatus
from orchestrator.db.transitions import transition_job, transition_worker
from orchestrator.engine.queries import workers as worker_queries
from tests.unit.engine.conftest import Harness, schedule_and_launch, wait_for


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T, Z, ...); '' once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return raw[raw.rindex(")") + 2 :].split()[0]


async def _set_status(harness: Harness, worker_id: str, status: WorkerStatus) -> None:
    async def change(session: object) -> None:
        await transition_worker(session, worker_id, status, actor="user:unit", reason="unit")  # type: ignore[arg-type]

    await harness.in_session(change)


async def _apply(harness: Harness) -> None:
    """One control step on what the database holds now (as a pass reads it)."""
    live = list(harness.engine.sup.live)
    read = await harness.in_session(lambda s: worker_queries.worker_statuses(s, live))
    await harness.engine.control.apply(read)


async def _apply_until(harness: Harness, holds: Callable[[], bool], what: str) -> None:
    async def applied() -> bool:
        await _apply(harness)
        return holds()

    await wait_for(applied, what)


async def test_pause_resume_and_terminate_reach_the_process(harness: Harness) -> None:
    await harness.submit(agent="sleep")
    (item,) = await schedule_and_launch(harness)
    assert item.spawned is not None
    proc, worker_id = item.spawned.proc, item.worker.id
    await wait_for(lambda: process_state(proc.pid) in ("S", "R"), "the worker to run")

    # Control is applied again until the process follows, as every pass of the engine does (a
    # signal not delivered, e.g. to a group not yet made under load, is sent again by the next).
    await _set_status(harness, worker_id, WorkerStatus.PAUSED)
    await _apply_until(harness, lambda: process_state(proc.pid) == "T", "the worker to be stopped (SIGSTOP)")
    assert proc.applied_paused

    await _set_status(harness, worker_id, WorkerStatus.RUNNING)
    await _apply_until(
        harness, lambda: process_state(proc.pid) in ("S", "R"), "the worker to run again (SIGCONT)"
    )
    assert not proc.applied_paused

    await _set_status(harness, worker_id, WorkerStatus.TERMINATED)
    await _apply(harness)
    assert proc.stop_signal_sent_at is not None
    await wait_for(lambda: proc.exited, "the worker to end (SIGTERM)")
    assert harness.engine.sup.exited == [proc]


async def test_signals_that_are_calls_to_a_node_leave_the_event_loop_free(harness: Harness) -> None:
    """A cluster executor's signal is a call to the worker's node, which may not answer for the
    call's timeout (a node that hangs), and the API shares the engine's event loop. Here each
    signal is sent only once a callback on the event loop has run meanwhile: sent from the loop
    itself, it would wait for that in vain."""
    await harness.submit(agent="sleep")
    (item,) = await schedule_and_launch(harness)
    assert item.spawned is not None
    proc, worker_id = item.spawned.proc, item.worker.id
    await wait_for(lambda: process_state(proc.pid) in ("S", "R"), "the worker to run")
    executor: Any = harness.engine.executor
    loop = asyncio.get_running_loop()
    sent: list[str] = []
    send_now = executor.send

    def send(target: Any, sig: signal.Signals) -> bool:
        ran = threading.Event()
        loop.call_soon_threadsafe(ran.set)
        sent.append(sig.name if ran.wait(timeout=30) else f"{sig.name}: the event loop was blocked")
        return bool(send_now(target, sig))

    executor.send = send
    executor.cluster_state = lambda: {"status": "connected", "executor": "a cluster's"}

    await _set_status(harness, worker_id, WorkerStatus.PAUSED)
    await _apply_until(harness, lambda: process_state(proc.pid) == "T", "the worker to be stopped (SIGSTOP)")
    await _set_status(harness, worker_id, WorkerStatus.RUNNING)
    await _apply_until(
        harness, lambda: process_state(proc.pid) in ("S", "R"), "the worker to run again (SIGCONT)"
    )
    await _set_status(harness, worker_id, WorkerStatus.TERMINATED)
    await _apply(harness)
    await wait_for(lambda: proc.exited, "the worker to end (SIGTERM)")
    assert sent[0] == "SIGSTOP" and sent[-2:] == ["SIGTERM", "SIGCONT"], sent
    assert all(name in ("SIGSTOP", "SIGCONT", "SIGTERM") for name in sent), sent


async def test_a_worker_past_its_timeout_is_failed_once(harness: Harness) -> None:
    job_id = await harness.submit(agent="sleep", timeout_seconds=0.2)
    (item,) = await schedule_and_launch(harness)
    record = harness.engine.sup.live[item.worker.id]
    assert record.deadline is not None
    await wait_for(lambda: time.monotonic() >= (record.deadline or 0), "the deadline to pass")
    await _apply(harness)
    (worker,) = await harness.workers(job_id)
    assert (worker.status, worker.status_reason) == (WorkerStatus.FAILED, "timeout")
    assert harness.engine.sup.live[item.worker.id].deadline is None  # applied: not again
    await wait_for(lambda: item.spawned is not None and item.spawned.proc.exited, "the worker to end")


async def test_a_worker_whose_job_ended_under_it_is_terminated(harness: Harness) -> None:
    job_id = await harness.submit(agent="sleep")
    (item,) = await schedule_and_launch(harness)

    async def cancel(session: object) -> None:
        await transition_job(session, job_id, JobStatus.CANCELED, actor="user:unit", reason="unit")  # type: ignore[arg-type]

    await harness.in_session(cancel)
    await _apply(harness)
    (worker,) = await harness.workers(job_id)
    assert (worker.status, worker.status_reason) == (WorkerStatus.TERMINATED, "its job is CANCELED")
    await wait_for(lambda: item.spawned is not None and item.spawned.proc.exited, "the worker to end")
