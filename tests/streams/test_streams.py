"""SSE streams on real servers: exactly-once delivery, resume, end of stream, several processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
from collections import Counter
from typing import Any

import httpx
import pytest

from orchestrator.db.models import WorkerLog
from orchestrator.db.session import Database
from tests.streams.sse import Stream, follow
from tests.support.db import seed_worker, settings_for
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

TREE = {
    "task_description": "stream me",
    "worker_count": 2,
    "agent_options": {
        "duration_seconds": 1,
        "progress_interval_seconds": 0.2,
        "subtasks": [
            {"task_description": "child", "worker_count": 1, "agent_options": {"duration_seconds": 1}}
        ],
    },
}


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    resp = client.post("/api/jobs/submit", json=body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def first_worker(client: httpx.Client, job_id: str) -> str:
    """The id of the job's first worker, once the engine has created it."""
    worker: dict[str, Any] = wait_until(
        lambda: next(
            iter(client.get("/api/supervisor/workers", params={"job_id": job_id}).json()["workers"]), None
        ),
        timeout=20,
        what="the job's worker",
    )
    return str(worker["id"])


def subtree_jobs(client: httpx.Client, root: str) -> list[str]:
    jobs, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        kids = [j["id"] for j in client.get("/api/jobs", params={"parent_job_id": parent}).json()["jobs"]]
        jobs += kids
        frontier += kids
    return jobs


def stored_history(client: httpx.Client, root: str) -> tuple[list[int], set[tuple[str, int]]]:
    """Event ids and (worker, seq) of every log line of the subtree, from the JSON API."""
    events = client.get(f"/api/jobs/{root}/events", params={"limit": 10_000}).json()["events"]
    lines: set[tuple[str, int]] = set()
    for job_id in subtree_jobs(client, root):
        for worker in client.get("/api/supervisor/workers", params={"job_id": job_id}).json()["workers"]:
            logs = client.get(f"/api/supervisor/workers/{worker['id']}/logs", params={"limit": 10_000}).json()
            assert logs["complete"], logs
            lines |= {(worker["id"], line["seq"]) for line in logs["lines"]}
    return [e["id"] for e in events], lines


def delivered(stream: Stream) -> tuple[list[int], list[tuple[str, int]]]:
    events = [m.json()["id"] for m in stream.messages if m.event not in ("log", "end")]
    logs = [(m.json()["worker_id"], m.json()["seq"]) for m in stream.of("log")]
    return events, logs


def assert_exactly_once(
    client: httpx.Client, root: str, events: list[int], logs: list[tuple[str, int]]
) -> None:
    stored_events, stored_lines = stored_history(client, root)
    assert [i for i, n in Counter(events).items() if n > 1] == [], "an event was delivered twice"
    assert [k for k, n in Counter(logs).items() if n > 1] == [], "a log line was delivered twice"
    assert sorted(events) == stored_events
    assert set(logs) == stored_lines
    assert len(stored_lines) > 0


def check_tree(server: Server) -> Stream:
    with server.client() as client:
        root = submit(client, TREE)
        stream = follow(client, f"/api/jobs/{root}/events?follow=true", max_seconds=60)
        assert stream.status_code == 200 and stream.content_type.startswith("text/event-stream")
        assert stream.ended, f"stream did not end: {stream.messages[-3:]}"
        assert stream.messages[-1].json() == {"job_id": root, "status": "COMPLETED"}
        # Final means final: every job of the subtree is, when the end arrives.
        for job_id in subtree_jobs(client, root):
            assert client.get(f"/api/jobs/{job_id}").json()["status"] == "COMPLETED"
        events, logs = delivered(stream)
        assert_exactly_once(client, root, events, logs)
        kinds = {m.event for m in stream.messages}
        assert {"job.status", "worker.status", "log", "end"} <= kinds
        jobs = {m.json()["job_id"] for m in stream.of("job.status")}
        assert len(jobs) == 3 and jobs == set(subtree_jobs(client, root)), "each worker's child job is in it"
        # Message ids are strictly increasing cursors.
        cursors = [m.id for m in stream.messages]
        assert all(c is not None for c in cursors)
        return stream


def latency_report(stream: Stream) -> str:
    from datetime import datetime

    delays = [
        m.received - datetime.fromisoformat(m.json()["created_at"]).timestamp()
        for m in stream.messages
        if m.event in ("job.status", "worker.status")
    ]
    return f"state change -> delivery: p50 {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms"


def test_follow_a_tree_delivers_everything_once_and_ends(server: Server) -> None:
    stream = check_tree(server)
    print(latency_report(stream))


def test_follow_works_across_two_processes(servers: ServerFactory) -> None:
    stream = check_tree(servers.start(workers=2))
    print(latency_report(stream))


def test_streams_hear_of_changes_made_by_an_engine_in_another_process(servers: ServerFactory) -> None:
    """The API serving the streams runs no engine: every start, log line, exit, slot and status
    comes from `orchestrator engine`, another process. Nothing in the API process commits them, so
    only the change mark can wake the streams (the suite pushes the idle poll out to 600 s): a
    missed wake-up leaves a stream open and fails here."""
    api = servers.start(ORCHESTRATOR_ENGINE="false")
    with servers.standalone_engine(api), api.client() as client:
        tree = check_tree(api)
        assert tree.ended
        job_id = submit(client, {"task_description": "log", "agent_options": {"duration_seconds": 1.5}})
        worker_id = first_worker(client, job_id)
        log = follow(client, f"/api/supervisor/workers/{worker_id}/logs?follow=true", max_seconds=60)
        assert log.ended, f"worker log stream did not end: {log.messages[-3:]}"
        assert log.messages[-1].json()["status"] == "COMPLETED"
        assert len(log.of("log")) > 0


def test_resume_with_last_event_id_has_no_gaps_and_no_duplicates(server: Server) -> None:
    with server.client() as client:
        body = {**TREE, "agent_options": {**TREE["agent_options"], "duration_seconds": 2}}
        root = submit(client, body)
        path = f"/api/jobs/{root}/events?follow=true"
        first = follow(client, path, max_messages=7)
        assert len(first.messages) == 7 and not first.ended
        parts = [first]
        while not parts[-1].ended:  # reconnect a few times mid-run, then to the end
            last_id = parts[-1].messages[-1].id
            parts.append(follow(client, path, last_event_id=last_id, max_messages=25, max_seconds=60))
        events: list[int] = []
        logs: list[tuple[str, int]] = []
        for part in parts:
            e, lg = delivered(part)
            events += e
            logs += lg
        assert len(parts) >= 3
        assert_exactly_once(client, root, events, logs)
        # A stream resumed at its very end says so at once.
        again = follow(client, path, last_event_id=parts[-1].messages[-1].id, max_seconds=10)
        assert [m.event for m in again.messages] == ["end"]


def test_heartbeats_and_end_on_cancel_without_engine(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false", ORCHESTRATOR_SSE_PING_SECONDS="0.3")
    with server.client() as client:
        root = submit(client, {"task_description": "waits forever"})
        idle = follow(client, f"/api/jobs/{root}/events?follow=true", max_seconds=1.5)
        assert not idle.ended, "a PENDING job's stream must stay open"
        assert [m.event for m in idle.messages] == ["job.status"]
        assert len(idle.comments) >= 3, f"expected pings every 0.3 s, got {idle.comments}"
        assert all(c.startswith(": ping") for c in idle.comments)
        # The cancel is committed by another request; the open stream sees it and ends.
        with httpx.Client(base_url=server.url, headers=client.headers) as other:
            import threading

            timer = threading.Timer(0.5, lambda: other.post(f"/api/jobs/{root}/cancel"))
            timer.start()
            rest = follow(client, f"/api/jobs/{root}/events?follow=true", last_event_id=idle.messages[-1].id)
            timer.join()
        assert [m.event for m in rest.messages] == ["job.status", "end"]
        assert rest.messages[0].json()["to_status"] == "CANCELED"
        assert rest.messages[1].json() == {"job_id": root, "status": "CANCELED"}


def test_follow_requires_the_same_scopes_and_visibility(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false")
    with server.client() as client:
        root = submit(client, {"task_description": "x"})
        plain = client.get(f"/api/jobs/{root}/events")
        assert plain.headers["content-type"] == "application/json"
        assert plain.json()["events"][0]["to_status"] == "PENDING"
        assert follow(client, "/api/jobs/j_missing/events?follow=true").status_code == 404
        assert follow(client, "/api/supervisor/workers/w_missing/logs?follow=true").status_code == 404
    with httpx.Client(base_url=server.url) as anonymous:
        assert follow(anonymous, f"/api/jobs/{root}/events?follow=true").status_code == 401
    with server.client(scopes=["resources:read"]) as weak:
        assert follow(weak, f"/api/jobs/{root}/events?follow=true").status_code == 403
        assert follow(weak, "/api/supervisor/workers/w_x/logs?follow=true").status_code == 403


@pytest.mark.parametrize("workers", [1, 2])
def test_follow_one_worker_log(servers: ServerFactory, workers: int) -> None:
    server = servers.start(workers=workers)
    with server.client() as client:
        root = submit(
            client,
            {
                "task_description": "log",
                "agent_options": {"duration_seconds": 1.5, "progress_interval_seconds": 0.1},
            },
        )
        worker_id = first_worker(client, root)
        path = f"/api/supervisor/workers/{worker_id}/logs?follow=true"
        head = follow(client, path, max_messages=6)
        seen = [m.json()["seq"] for m in head.of("log")]
        tail = follow(client, path, last_event_id=[m for m in head.messages if m.id][-1].id, max_seconds=30)
        assert tail.ended
        seen += [m.json()["seq"] for m in tail.of("log")]
        assert seen == list(range(len(seen))), "every line once, in order"
        stored = client.get(f"/api/supervisor/workers/{worker_id}/logs", params={"limit": 10_000}).json()
        assert stored["complete"] and len(stored["lines"]) == len(seen)
        assert tail.messages[-1].json()["status"] == "COMPLETED"
        assert "COMPLETED" in [m.json()["status"] for m in tail.of("status")]


def test_a_log_line_that_commits_after_a_later_one_still_reaches_its_stream(servers: ServerFactory) -> None:
    """Two writers in other processes' shoes: worker X's first line is written in a transaction
    that stays open while worker Y's line — a larger id — commits. On PostgreSQL ids can commit
    out of order, so when X's line finally commits no maximum moves: X's stream must still be
    woken (the change mark notes the transactions in progress). On SQLite the second writer waits
    for the first, and the same steps run in order."""
    api = servers.start(ORCHESTRATOR_ENGINE="false")
    with api.client() as client:
        job_id = submit(client, {"task_description": "two writers"})
    worker_x, worker_y = seed_worker(api, job_id), seed_worker(api, job_id)
    opened, lines = threading.Event(), list[str]()

    def read() -> None:
        """X's log stream, open (its first message read) before the writers start."""
        path = f"/api/supervisor/workers/{worker_x}/logs?follow=true"
        with api.client() as c, c.stream("GET", path, timeout=httpx.Timeout(60, connect=5)) as resp:
            event = ""
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:") and event == "status":
                    opened.set()
                elif line.startswith("data:") and event == "log":
                    lines.append(line)
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert opened.wait(20), "X's stream did not open"

    async def write() -> None:
        first, second = Database(settings_for(api)), Database(settings_for(api))
        try:
            async with first.session() as session:
                session.add(WorkerLog(worker_id=worker_x, job_id=job_id, seq=0, text="x0"))
                await session.flush()  # X's line has its id; its transaction stays open

                async def later_line() -> None:
                    async with second.session() as other:
                        other.add(WorkerLog(worker_id=worker_y, job_id=job_id, seq=0, text="y0"))

                later = asyncio.create_task(later_line())
                with contextlib.suppress(TimeoutError):  # SQLite: it waits for the first writer
                    await asyncio.wait_for(asyncio.shield(later), 1.0)
                await asyncio.sleep(1.0)  # streams woken by Y's line found nothing for X
            await asyncio.wait_for(later, 10)
        finally:
            await first.dispose()
            await second.dispose()

    asyncio.run(write())
    reader.join(60)
    assert lines, "X's stream never delivered its line"
    assert json.loads(lines[0].removeprefix("data:"))["text"] == "x0"
