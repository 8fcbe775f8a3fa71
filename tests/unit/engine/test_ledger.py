"""The ledger alone: starts and exits of real processes recorded, jobs settled from how their
workers and children ended."""

from __future__ import annotations

from datetime import UTC, datetime

from orchestrator.agents.base import Outcome
from orchestrator.core.states import JobStatus, WorkerStatus
from orchestrator.engine.ledger import ending_of, settlement
from orchestrator.engine.queries.rows import WorkerEnding
from orchestrator.resources import repository as slots_repo
from tests.unit.engine.conftest import Harness, record_exits, schedule_and_launch, wait_for


class _Job:
    id, status, depth, started_at = "job-1", "RUNNING", 0, datetime(2026, 1, 1, tzinfo=UTC)


async def test_starts_then_exits_are_recorded_and_the_job_settles_completed(harness: Harness) -> None:
    job_id = await harness.submit(agent="true", worker_count=2)
    launched = await schedule_and_launch(harness)
    assert len(launched) == 2 and all(item.spawned is not None for item in launched)
    assert (await harness.job(job_id)).status == JobStatus.RUNNING
    workers = await harness.workers(job_id)
    assert {w.status for w in workers} == {WorkerStatus.RUNNING}
    assert {w.pid for w in workers} == {item.spawned.proc.pid for item in launched if item.spawned}

    await wait_for(lambda: len(harness.engine.sup.exited) == 2, "both processes to exit")
    await record_exits(harness)

    workers = await harness.workers(job_id)
    assert [(w.status, w.exit_code, w.holds_slot) for w in workers] == [
        (WorkerStatus.COMPLETED, 0, False)
    ] * 2
    job = await harness.job(job_id)
    assert (job.status, job.status_reason) == (JobStatus.COMPLETED, "all workers and child jobs completed")
    assert await harness.in_session(lambda s: slots_repo.pools_free(s, None)) == {0: 2, 1: 1}
    assert harness.engine.sup.live == {}


async def test_a_failed_worker_fails_its_job_with_the_workers_reason(harness: Harness) -> None:
    job_id = await harness.submit(agent="fail")
    await schedule_and_launch(harness)
    await wait_for(lambda: len(harness.engine.sup.exited) == 1, "the process to exit")
    await record_exits(harness)
    (worker,) = await harness.workers(job_id)
    assert (worker.status, worker.status_reason, worker.exit_code) == (WorkerStatus.FAILED, "exit code 3", 3)
    job = await harness.job(job_id)
    assert job.status == JobStatus.FAILED
    assert job.status_reason == f"worker {worker.id} FAILED: exit code 3"


async def test_a_job_with_a_live_worker_is_not_settled(harness: Harness) -> None:
    job_id = await harness.submit(agent="sleep")
    await schedule_and_launch(harness)
    await harness.in_session(harness.engine.ledger.settle_jobs)
    assert (await harness.job(job_id)).status == JobStatus.RUNNING


def test_settlement_waits_for_children_and_for_exits_being_recorded() -> None:
    done = WorkerEnding("w1", WorkerStatus.COMPLETED, None, False)
    assert settlement(_Job(), [("c1", JobStatus.RUNNING)], [done]) is None
    assert settlement(_Job(), [], [WorkerEnding("w1", WorkerStatus.COMPLETED, None, True)]) is None
    assert settlement(_Job(), [("c1", JobStatus.CANCELED)], [done]) == (
        JobStatus.FAILED,
        "child job c1 CANCELED",
    )
    bad = [WorkerEnding(f"w{i}", WorkerStatus.FAILED, None, False) for i in range(3)]
    assert settlement(_Job(), [], bad) == (
        JobStatus.FAILED,
        "worker w0 FAILED: no reason recorded (and 2 more)",
    )
    assert settlement(_Job(), [("c1", JobStatus.COMPLETED)], [done]) == (
        JobStatus.COMPLETED,
        "all workers and child jobs completed",
    )


def test_an_ending_is_the_agents_outcome_else_the_exit_code() -> None:
    assert ending_of(Outcome(False, "the agent said no"), 0) == (WorkerStatus.FAILED, "the agent said no")
    assert ending_of(None, 0) == (WorkerStatus.COMPLETED, "exit code 0")
    assert ending_of(None, None) == (WorkerStatus.FAILED, "killed: the worker ended without an exit status")
    assert ending_of(None, 137) == (WorkerStatus.FAILED, "exit code 137 (signal 9)")
    assert ending_of(None, 2) == (WorkerStatus.FAILED, "exit code 2")
