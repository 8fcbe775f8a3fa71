"""`/health` is answered with bytes kept per database (api/routers/health.py `HealthRoute`): the
same answer as the endpoint gives, through every middleware, and a new one when the app's
database is another."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx

from orchestrator.api.main import create_app


def _database(dialect: str) -> SimpleNamespace:
    return SimpleNamespace(engine=SimpleNamespace(dialect=SimpleNamespace(name=dialect)))


def test_health_answers_the_endpoints_body_through_the_middlewares_and_follows_the_database() -> None:
    app = create_app()  # no lifespan: the database is what the test sets

    async def answers() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            app.state.db = _database("sqlite")
            first = await client.get("/health")
            again = await client.get("/health", headers={"X-Request-Id": "probe-2"})
            app.state.db = _database("postgresql")
            moved = await client.get("/health")
            return [first, again, moved]

    first, again, moved = asyncio.run(answers())
    for response in (first, again, moved):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"]  # the observability middleware's
        assert "content-security-policy" in response.headers  # the security headers'
    assert first.json() == again.json() == {"status": "ok", "database": "sqlite"}
    assert again.headers["x-request-id"] == "probe-2"
    assert moved.json() == {"status": "ok", "database": "postgresql"}
