"""The FastAPI application: `uvicorn orchestrator.api.main:app`.

Each process that serves the API also runs an engine (unless ORCHESTRATOR_ENGINE=false), so
`--workers 4` gives four engines sharing the database; each job is claimed by exactly one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from orchestrator.agents.registry import AgentRegistry
from orchestrator.api.errors import install_error_handlers
from orchestrator.api.observability import install_observability
from orchestrator.api.routers import (
    fleet,
    health,
    jobs,
    metrics,
    resources,
    results,
    supervisor,
    web,
    workspaces,
)
from orchestrator.api.routers.streams import stop_watcher as stop_stream_watcher
from orchestrator.bootstrap import prepare_database
from orchestrator.core.auth import SCOPE_DESCRIPTIONS
from orchestrator.core.config import Settings, get_settings
from orchestrator.db.session import Database
from orchestrator.mcp.http import McpOverHttp

log = logging.getLogger("orchestrator")

try:
    VERSION = version("parallel-ai-orchestrator")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "2.0.0"

DESCRIPTION = (
    """Run many AI coding agents in parallel, as a tree of supervised jobs.

All endpoints except `/health` need `Authorization: Bearer <jwt>`. Scopes:

"""
    + "\n".join(f"* `{scope}`: {text}" for scope, text in SCOPE_DESCRIPTIONS.items())
    + """

A `:write` scope implies the matching `:read` scope.
"""
)


class StartupError(RuntimeError):
    pass


def check_startup_settings(settings: Settings) -> None:
    if settings.is_production and (not settings.secret_key or len(settings.secret_key.encode()) < 32):
        raise StartupError(
            "ENVIRONMENT=production needs SECRET_KEY set to at least 32 bytes "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    check_startup_settings(settings)
    settings.signing_key()  # create the stored key now, not racing in the first request
    database = Database(settings)
    await prepare_database(database, settings)
    app.state.db = database
    app.state.agents = AgentRegistry.from_settings(settings)
    engine = None
    if settings.orchestrator_engine:
        from orchestrator.engine.engine import Engine

        engine = Engine(settings, database, app.state.agents)
        await engine.start()
    app.state.engine = engine
    try:
        yield
    finally:
        if engine is not None:
            await engine.stop()
        await app.state.mcp_http.close()
        await stop_stream_watcher(database)
        await database.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Parallel AI Orchestrator",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(supervisor.router)
    app.include_router(jobs.router)
    app.include_router(results.router)
    app.include_router(fleet.router)
    app.include_router(resources.router)
    app.include_router(workspaces.router)
    app.include_router(metrics.router)
    app.include_router(web.router)
    # The delegation tools for agents, over MCP streamable HTTP (worker tokens only).
    app.state.mcp_http = McpOverHttp(settings.public_url)
    app.mount("/mcp", app.state.mcp_http)
    install_observability(app)
    return app


app = create_app()


def export_openapi() -> str:
    """The OpenAPI document as committed in `openapi.json` at the repository root."""
    import json

    return json.dumps(create_app().openapi(), indent=2, sort_keys=False) + "\n"
