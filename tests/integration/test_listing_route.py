"""`GET /api/jobs`'s plain case, a user's token and at most `limit` and `offset`, answered without
FastAPI's dependency solving (orchestrator/api/listing_route.py): the same answers as the full
way, which still takes every other request (filters, refusals, workers' tokens).

Runs on SQLite and on PostgreSQL (TEST_DATABASE).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pytest

from orchestrator.api.main import create_app
from orchestrator.core.config import Settings
from tests.support.servers import Server, ServerFactory, server_factory, token

VARYING = {"date", "x-request-id"}


def _headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name not in VARYING}


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose jobs stay as submitted (no engine runs them): two answers to compare are
    of the same data."""
    with server_factory(tmp_path_factory.mktemp("listed")) as factory:
        server = factory.make(ORCHESTRATOR_ENGINE="false").start()
        with server.client() as client:
            for n in range(5):
                response = client.post("/api/jobs/submit", json={"task_description": f"plain {n}"})
                assert response.status_code == 201
        yield server


@pytest.mark.parametrize("query", ["", "?limit=3", "?offset=2", "?limit=2&offset=1", "?offset=0&limit=1000"])
def test_the_plain_case_answers_as_the_full_way(listed: Server, query: str) -> None:
    """`root_only=false` filters nothing, but is a filter: the full way answers it."""
    with listed.client() as client:
        plain = client.get(f"/api/jobs{query}")
        full = client.get(f"/api/jobs{query}{'&' if query else '?'}root_only=false")
    assert plain.status_code == full.status_code == 200
    assert plain.content == full.content
    assert _headers(plain) == _headers(full)
    assert plain.json()["total"] >= 5


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("?limit=0", None, 422),
        ("?limit=1001", None, 422),
        ("?offset=2147483648", None, 422),
        ("?limit=-1", None, 422),
        ("?limit=x", None, 422),
        ("?limit=1&limit=2", None, 200),
        ("?limit=%32", None, 200),
        ("", {"Authorization": "Bearer nonsense"}, 401),
        ("", {"Authorization": "Basic abc"}, 401),
        ("", {"Authorization": ""}, 401),
        ("", {"Authorization": f"Bearer {token(['jobs:write'])}"}, 200),  # write implies read
        ("", {"Authorization": f"Bearer {token(['resources:read'])}"}, 403),
    ],
)
def test_what_is_not_plain_is_answered_the_full_way(
    listed: Server, query: str, headers: dict[str, str] | None, status: int
) -> None:
    with listed.client() as client:
        response = client.get(f"/api/jobs{query}", headers=headers)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["total"] >= 5


def test_the_plain_case_solves_no_dependency(
    tmp_path: Path, servers: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (the count is of this process's calls): no dependency solved for the plain
    case; the full way solves them for a filtered one."""
    settings = Settings(
        orchestrator_data_dir=tmp_path, database_url=servers.database_url(), orchestrator_engine=False
    )
    app = create_app(settings)
    solved: list[Any] = []
    solve = fastapi.routing.solve_dependencies

    async def counted(*args: Any, **kwargs: Any) -> Any:
        solved.append(kwargs.get("dependant"))
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)
    headers = {"Authorization": f"Bearer {token()}"}

    async def requests() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as client:
                plain = await client.get("/api/jobs?limit=5")
                assert plain.status_code == 200 and solved == []
                filtered = await client.get("/api/jobs?limit=5&status=RUNNING")
                assert filtered.status_code == 200 and solved != []

    # The app's start-up makes its process's umask 077 (bootstrap.py); here that process is the
    # test run's, whose later tests write files sandboxed agents must read: put it back.
    umask = os.umask(0o077)
    os.umask(umask)
    try:
        asyncio.run(requests())
    finally:
        os.umask(umask)
