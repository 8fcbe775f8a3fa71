"""Ingest alone: a worker's output is stored exactly once, from the offset stored with it, and
what the agent says is kept for its ending."""

from __future__ import annotations

import dataclasses

from sqlalchemy import select

from orchestrator.db.models import WorkerLog
from orchestrator.engine.ingest import note, spend_of
from orchestrator.engine.logs import LogCursor
from orchestrator.engine.supervision import AgentRun
from tests.unit.engine.conftest import Harness, schedule_and_launch, wait_for


async def _logs(harness: Harness, worker_id: str) -> list[tuple[int, str]]:
    stmt = (
        select(WorkerLog.seq, WorkerLog.text).where(WorkerLog.worker_id == worker_id).order_by(WorkerLog.seq)
    )
    return [tuple(row) for row in await harness.in_session(lambda s: s.execute(stmt))]  # type: ignore[misc]


async def test_lines_are_stored_exactly_once_from_the_stored_offset(harness: Harness) -> None:
    job_id = await harness.submit(agent="lines")
    (item,) = await schedule_and_launch(harness)
    assert item.spawned is not None
    proc, worker_id = item.spawned.proc, item.worker.id
    await wait_for(lambda: proc.exited, "the worker to print and end")
    assert proc.output_path.read_text() == "one\ntwo\nthree\n"

    # As an engine that took over after "one" was stored: its cursor starts at the stored offset.
    sup = harness.engine.sup
    sup.live[worker_id] = dataclasses.replace(sup.live[worker_id], cursor=LogCursor(proc.output_path, 4, 1))
    await harness.engine.ingest.ingest(worker_id, final=False)
    await harness.engine.ingest.ingest(worker_id, final=False)
    assert await _logs(harness, worker_id) == [(1, "two"), (2, "three")]
    (worker,) = await harness.workers(job_id)
    assert (worker.log_offset, worker.log_lines) == (len("one\ntwo\nthree\n"), 3)

    with proc.output_path.open("a") as handle:
        handle.write("four\nfive, unterminated")
    await harness.engine.ingest.ingest_all()
    assert await _logs(harness, worker_id) == [(1, "two"), (2, "three"), (3, "four")]
    await harness.engine.ingest.ingest(worker_id, final=True)  # an ending drains the tail
    await harness.engine.ingest.ingest(worker_id, final=True)
    assert await _logs(harness, worker_id) == [
        (1, "two"),
        (2, "three"),
        (3, "four"),
        (4, "five, unterminated"),
    ]


def test_the_final_result_gets_what_the_agent_said_earlier() -> None:
    run = AgentRun()
    note(run, "init", {"session_id": "s-1"})
    note(run, "message", {"text": "done it"})
    note(run, "tool_refused", {"tool": "Bash"})
    assert run.result is None
    note(run, "result", {"usage": {}})
    assert run.result == {
        "usage": {},
        "refused_tools": [{"tool": "Bash"}],
        "result": "done it",
        "session_id": "s-1",
    }
    note(run, "result", {"result": "own words", "session_id": "s-2"})
    assert run.result is not None and (run.result["result"], run.result["session_id"]) == ("own words", "s-2")


def test_spend_counts_numbers_only() -> None:
    usage = {
        "input_tokens": 10,
        "cache_read_input_tokens": 5,
        "cache_creation_input_tokens": 1,
        "output_tokens": 7,
    }
    assert spend_of({"total_cost_usd": 0.5, "usage": usage}) == (0.5, 16, 7)
    assert spend_of({"total_cost_usd": True, "usage": {"input_tokens": "9", "output_tokens": None}}) == (
        0.0,
        0,
        0,
    )
    assert spend_of({"usage": "not a dict"}) == (0.0, 0, 0)
