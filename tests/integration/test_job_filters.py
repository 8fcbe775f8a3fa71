"""The jobs list's filters, search, paging and per-status counts, and the fleet stream, against
answers computed from seeded rows, on the database under test (SQLite or PostgreSQL)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta, timezone
from typing import Any

import httpx
import pytest

from orchestrator.core.auth import ALL_SCOPES, create_access_token
from tests.streams.sse import Stream, follow
from tests.support.db import seed_worker
from tests.support.seed import SeededJob, newest_first, seed_fleet
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

ROOTS = 400


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[SeededJob]]]:
    """A server without an engine (nothing changes the seeded rows) and its seeded fleet."""
    factory = ServerFactory(tmp_path_factory.mktemp("filters"))
    try:
        server = factory.start(ORCHESTRATOR_ENGINE="false")
        yield server, seed_fleet(server, ROOTS)
    finally:
        factory.close()


def all_ids(client: httpx.Client, **params: Any) -> list[str]:
    """Every id the list returns for `params`, page by page (checks the totals on the way)."""
    ids: list[str] = []
    total = None
    while True:
        page = client.get("/api/jobs", params={**params, "limit": 97, "offset": len(ids)})
        assert page.status_code == 200, page.text
        body = page.json()
        assert total is None or body["total"] == total, "the total moved between pages"
        total = body["total"]
        ids += [job["id"] for job in body["jobs"]]
        if not body["jobs"]:
            break
    assert len(ids) == total == len(set(ids))
    return ids


def expect(jobs: list[SeededJob], keep: Callable[[SeededJob], bool]) -> list[str]:
    return [j.id for j in newest_first(jobs) if keep(j)]


def test_each_filter_matches_the_rows(fleet: tuple[Server, list[SeededJob]]) -> None:
    server, jobs = fleet
    middle = newest_first(jobs)[len(jobs) // 2].created_at
    cases: list[tuple[dict[str, Any], Callable[[SeededJob], bool]]] = [
        ({}, lambda j: True),
        ({"status": "FAILED"}, lambda j: j.status == "FAILED"),
        ({"depth": 1}, lambda j: j.depth == 1),
        ({"agent": "codex"}, lambda j: j.agent == "codex"),
        ({"repository": "/srv/repos/billing"}, lambda j: j.repository == "/srv/repos/billing"),
        ({"root_only": "true"}, lambda j: j.parent_job_id is None),
        ({"created_before": middle.isoformat()}, lambda j: j.created_at < middle),
        # A time without a zone is UTC; one with a zone is converted.
        ({"created_after": middle.replace(tzinfo=None).isoformat()}, lambda j: j.created_at >= middle),
        (
            {"created_after": middle.astimezone(UTC).astimezone(tz_plus_two()).isoformat()},
            lambda j: j.created_at >= middle,
        ),
        (
            {"root_only": "true", "status": "CANCELED", "agent": "simulated"},
            lambda j: j.parent_job_id is None and j.status == "CANCELED" and j.agent == "simulated",
        ),
    ]
    with server.client() as client:
        for params, keep in cases:
            wanted = expect(jobs, keep)
            assert wanted, f"the seed has no job for {params}"
            assert all_ids(client, **params) == wanted, params


def tz_plus_two() -> timezone:
    return timezone(timedelta(hours=2))


def test_search_ids_and_text_case_insensitive_and_literal(fleet: tuple[Server, list[SeededJob]]) -> None:
    server, jobs = fleet
    child = next(j for j in jobs if j.depth == 2)
    with server.client() as client:
        assert all_ids(client, q=child.id) == [child.id]
        assert all_ids(client, q=child.id[2:9].upper()) == expect(jobs, lambda j: child.id[2:9] in j.id)
        assert all_ids(client, q="BILLING") == expect(jobs, lambda j: "billing" in j.task_description.lower())
        # LIKE's wildcards are plain characters in a search.
        assert all_ids(client, q="100%") == expect(jobs, lambda j: "100%" in j.task_description)
        assert all_ids(client, q="snake_case") == expect(jobs, lambda j: "snake_case" in j.task_description)
        assert all_ids(client, q="%") == expect(jobs, lambda j: "%" in j.task_description)
        assert all_ids(client, q="_") == expect(jobs, lambda j: "_" in j.task_description or "_" in j.id)
        assert all_ids(client, q="no such words anywhere") == []
        both = all_ids(client, q="tests", agent="claude_code", depth=0)
        assert both == expect(
            jobs,
            lambda j: "tests" in j.task_description.lower() and j.agent == "claude_code" and j.depth == 0,
        )


def test_pages_are_disjoint_and_ordered(fleet: tuple[Server, list[SeededJob]]) -> None:
    server, jobs = fleet
    roots = expect(jobs, lambda j: j.parent_job_id is None)
    with server.client() as client:
        first = client.get("/api/jobs", params={"root_only": "true", "limit": 50}).json()
        second = client.get("/api/jobs", params={"root_only": "true", "limit": 50, "offset": 50}).json()
        last = client.get("/api/jobs", params={"root_only": "true", "limit": 50, "offset": ROOTS - 10}).json()
    assert first["total"] == second["total"] == ROOTS
    assert [j["id"] for j in first["jobs"]] == roots[:50]
    assert [j["id"] for j in second["jobs"]] == roots[50:100]
    assert [j["id"] for j in last["jobs"]] == roots[-10:]


def test_counts_per_status(fleet: tuple[Server, list[SeededJob]]) -> None:
    server, jobs = fleet
    with server.client() as client:
        everything = client.get("/api/jobs/counts").json()
        seeded = Counter(j.status for j in jobs)
        statuses = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELED")
        assert everything["counts"] == {s: seeded[s] for s in statuses}
        assert everything["total"] == len(jobs)
        # The other filters narrow the counts; the status filter does not (they are its choices).
        narrowed = client.get(
            "/api/jobs/counts", params={"agent": "codex", "root_only": "true", "status": "FAILED"}
        ).json()
        wanted = Counter(j.status for j in jobs if j.agent == "codex" and j.parent_job_id is None)
        assert {s: n for s, n in narrowed["counts"].items() if n} == dict(wanted)
        assert narrowed["total"] == sum(wanted.values())


@pytest.mark.parametrize(
    "params",
    [
        {"created_after": "2026-01-02T00:00:00Z", "created_before": "2026-01-01T00:00:00Z"},
        {"created_after": "2026-01-01T00:00:00Z", "created_before": "2026-01-01T00:00:00Z"},
        {"created_after": "yesterday"},
        {"q": "a\x00b"},
        {"agent": "\x00"},
        {"repository": "/srv\x00"},
        {"q": "x" * 201},
        {"status": "DONE"},
        {"depth": -1},
        {"root_only": "perhaps"},
        {"created_before": "9999-99-99"},
    ],
)
def test_nonsense_is_422_never_500(fleet: tuple[Server, list[SeededJob]], params: dict[str, str]) -> None:
    server, _ = fleet
    with server.client() as client:
        for path in ("/api/jobs", "/api/jobs/counts"):
            response = client.get(path, params=params)
            assert response.status_code == 422, (path, params, response.text)
            detail = response.json()["detail"]
            assert isinstance(detail, list) and detail[0]["loc"][0] == "query", detail


def test_a_worker_token_lists_and_counts_only_its_subtree(fleet: tuple[Server, list[SeededJob]]) -> None:
    server, jobs = fleet
    child = next(j for j in jobs if j.depth == 1 and any(k.parent_job_id == j.id for k in jobs))
    subtree = [j for j in jobs if j.path.startswith(child.path)]
    worker_id = seed_worker(server, child.id, status="RUNNING")
    worker_token = create_access_token(
        user_id="test-user", scopes=ALL_SCOPES, worker_id=worker_id, job_id=child.id
    )
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {worker_token}"}) as client:
        assert all_ids(client) == expect(subtree, lambda j: True)
        assert all_ids(client, root_only="true") == [child.id]
        assert all_ids(client, q="#") == expect(subtree, lambda j: True)
        counts = client.get("/api/jobs/counts").json()
        assert counts["total"] == len(subtree)
        assert {s: n for s, n in counts["counts"].items() if n} == dict(Counter(j.status for j in subtree))


# --- the fleet stream --------------------------------------------------------------------------


def submit(client: httpx.Client, text: str, **extra: Any) -> str:
    response = client.post("/api/jobs/submit", json={"task_description": text, **extra})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def in_thread(work: Callable[[], Stream]) -> tuple[threading.Thread, list[Stream]]:
    out: list[Stream] = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    return thread, out


def test_fleet_stream_delivers_new_changes_without_replay_and_resumes(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false")
    with server.client() as client:
        before = submit(client, "submitted before the stream opened")
        thread, out = in_thread(lambda: follow(client, "/api/fleet/events?follow=true", max_messages=1))
        # Keep submitting until the stream has seen one: it must be one of these, never `before`.
        later: list[str] = []
        while thread.is_alive() and len(later) < 200:
            later.append(submit(client, f"submitted while streaming {len(later)}"))
            thread.join(0.2)
        thread.join(30)
        assert out and out[0].status_code == 200, out
        first = out[0].messages[0]
        event = first.json()
        assert first.event == "job.status" and event["to_status"] == "PENDING"
        assert event["job_id"] in later and event["job_id"] != before
        assert event["root_job_id"] == event["job_id"] and event["parent_job_id"] is None

        # Resuming after that message: the rest, in order, nothing repeated; a cancel is a change too.
        client.post(f"/api/jobs/{later[-1]}/cancel").raise_for_status()
        index = later.index(event["job_id"])
        wanted = [(j, "PENDING") for j in later[index + 1 :]] + [(later[-1], "CANCELED")]
        resumed = follow(
            client, "/api/fleet/events?follow=true", last_event_id=first.id, max_messages=len(wanted)
        )
        got = [(m.json()["job_id"], m.json()["to_status"]) for m in resumed.messages]
        assert got == wanted

        # The JSON form from the same cursor agrees.
        page = client.get("/api/fleet/events", params={"after_id": event["id"]}).json()
        assert [(e["job_id"], e["to_status"]) for e in page["events"]] == wanted
        assert page["cursor"] == resumed.messages[-1].id


@pytest.mark.parametrize("bad", ["nonsense", "e-1-l0", "e99999999999999999999999-l0", "12"])
def test_fleet_stream_refuses_a_cursor_it_never_sent(server: Server, bad: str) -> None:
    with server.client() as client:
        response = client.get("/api/fleet/events?follow=true", headers={"Last-Event-ID": bad})
    assert response.status_code == 400, response.text
    assert "Last-Event-ID" in response.json()["detail"]


def test_fleet_stream_of_a_worker_token_is_its_subtree_only(servers: ServerFactory) -> None:
    """A hostile worker must not learn of other trees through the fleet stream."""
    server = servers.start(ORCHESTRATOR_ENGINE="false")
    with server.client() as client:
        mine = submit(client, "the worker's own job")
        worker_id = seed_worker(server, mine, status="RUNNING")
        cursor = client.get("/api/fleet/events", params={"limit": 10_000}).json()["cursor"]
        worker_token = create_access_token(
            user_id="test-user", scopes=ALL_SCOPES, worker_id=worker_id, job_id=mine
        )
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {worker_token}"}) as worker:
            thread, out = in_thread(
                lambda: follow(worker, "/api/fleet/events?follow=true", last_event_id=cursor, max_messages=1)
            )
            other = submit(client, "someone else's tree")
            client.post(f"/api/jobs/{other}/cancel").raise_for_status()
            child = submit(worker, "my sub-job", parent_job_id=mine, depth=1)
            thread.join(60)
            assert out and out[0].messages, "the worker's stream delivered nothing"
            event = out[0].messages[0].json()
            assert (event["job_id"], event["to_status"]) == (child, "PENDING")
            assert event["root_job_id"] == mine and event["parent_job_id"] == mine
            page = worker.get("/api/fleet/events", params={"after_id": 0}).json()["events"]
            assert {e["job_id"] for e in page} == {mine, child}
    wait_until(lambda: not thread.is_alive(), 5, what="the reader to finish")
