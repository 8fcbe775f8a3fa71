"""`wait_for_jobs` (and `spawn_subjob(wait=True)`) learn that a sub-job ended from its events
stream: with both of its status polls pushed out to 600 s, the wait still ends as soon as the
sub-job does. The tool runs here in the test process, as the per-worker stdio server would, with
the delegated token of a live worker of a real server."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from orchestrator.core.auth import create_access_token
from orchestrator.engine.engine import WORKER_TOKEN_SCOPES
from orchestrator.mcp import server as tools
from tests.integration.test_engine_lifecycle import agents_file, submit, wait_final, workers_of
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until


def test_a_wait_ends_when_the_sub_job_does_not_at_the_next_poll(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = servers.start(ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with api.client() as client:
        parent = submit(client, agent="ticker")  # a worker that runs until canceled
        worker = wait_until(
            lambda: next((w for w in workers_of(client, parent["id"]) if w["status"] == "RUNNING"), None),
            timeout=15,
        )
        delegated = create_access_token(
            user_id="test-user",
            scopes=WORKER_TOKEN_SCOPES,
            expires_delta=timedelta(hours=1),
            worker_id=worker["id"],
            job_id=parent["id"],
        )
        monkeypatch.setattr(tools, "api", tools.Api(api.url, delegated, parent["id"], depth=0))
        monkeypatch.setattr(tools, "POLL_SECONDS", 600.0)
        monkeypatch.setattr(tools, "STREAM_POLL_SECONDS", 600.0)

        async def delegate_and_wait() -> tuple[str, dict[str, str], list[str]]:
            try:
                child = await tools.api.call(
                    "POST",
                    "/api/jobs/submit",
                    json={
                        "task_description": "child",
                        "depth": 1,
                        "parent_job_id": parent["id"],
                        "agent": "simulated",
                        "agent_options": {"duration_seconds": 0.3},
                    },
                )
                started = time.monotonic()
                statuses, pending = await tools._wait([child["id"]], timeout_seconds=600)
                # At 600 s the wait would end on its deadline, reading a status it never polled:
                # ending well before it (generous on a loaded host) is what only the stream can do.
                assert time.monotonic() - started < 400, "the wait must end on the stream's `end`"
                return child["id"], statuses, pending
            finally:
                await tools.api.aclose()

        child_id, statuses, pending = asyncio.run(delegate_and_wait())
        assert pending == [] and statuses == {child_id: "COMPLETED"}, statuses
        client.post(f"/api/jobs/{parent['id']}/cancel")
        assert wait_final(client, parent["id"])["status"] == "CANCELED"
