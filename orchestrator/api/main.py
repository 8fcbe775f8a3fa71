"""The FastAPI application: `uvicorn orchestrator.api.main:app`.

Each process that serves the API is ready to run an engine (unless ORCHESTRATOR_ENGINE=false): of
the processes on one host sharing a database (`--workers 4`, or several servers), one runs it and
the others stand by, taking over the moment it ends (orchestrator/api/leadership.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from orchestrator.agents.registry import AgentRegistry
from orchestrator.api.errors import install_error_handlers
from orchestrator.api.leadership import EngineSeat, lock_path
from orchestrator.api.limits import RequestLimitsMiddleware, bound_httptools_headers
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
from orchestrator.api.security_headers import SecurityHeadersMiddleware
from orchestrator.bootstrap import prepare_database
from orchestrator.core.address import current_address, settings_address, wait_for_address
from orchestrator.core.auth import SCOPE_DESCRIPTIONS
from orchestrator.core.config import Settings, get_settings
from orchestrator.core.logsafe import install_log_escaping
from orchestrator.db.session import Database
from orchestrator.mcp.http import McpOverHttp
from orchestrator.streams.wakeups import WakeHub

if TYPE_CHECKING:
    from orchestrator.engine.engine import Engine

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
    database = Database(settings)
    await prepare_database(database, settings)  # first: it makes the data dir private
    settings.signing_key()  # create the stored key now, not racing in the first request
    app.state.db = database
    app.state.wakeups = WakeHub.from_settings(database, settings)  # the streams' wake-ups, this app's own
    app.state.wakeups.start()
    app.state.agents = AgentRegistry.from_settings(settings)
    app.state.engine = None
    app.state.engine_db = None  # the engine's (Database.engine_database), made when it starts
    app.state.engine_seat = None
    seat_task: asyncio.Task[None] | None = None
    if settings.orchestrator_engine:
        seat = EngineSeat(lock_path(settings.async_database_url), lambda: _start_engine(app))
        app.state.engine_seat = seat
        seat_task = asyncio.create_task(_take_seat(seat), name="engine-seat")
    # What start-up made lives as long as the process: out of the collector's reach, a full
    # collection no longer walks it (60 ms pauses, measured, in the middle of requests).
    gc.freeze()
    try:
        yield
    finally:
        if seat_task is not None:
            seat_task.cancel()  # a standby stops waiting; a start under way is finished, then stopped
            with contextlib.suppress(asyncio.CancelledError):
                await seat_task
        if app.state.engine_seat is not None:
            app.state.engine = None
            await app.state.engine_seat.close()  # stops the engine, then lets a standby take over
        if app.state.engine_db is not None and app.state.engine_db is not database:
            await app.state.engine_db.dispose()
        await app.state.mcp_http.close()
        await app.state.wakeups.stop()
        await database.dispose()


async def _start_engine(app: FastAPI) -> Engine:
    """Start this process's engine, handing workers the address this server is reached at: an
    explicit URL, or the sockets handed over (--workers, gunicorn); a single uvicorn process binds
    its socket after its start-up, so this waits for it."""
    from orchestrator.engine.engine import Engine

    settings: Settings = app.state.settings
    address = current_address(settings) or await wait_for_address(settings)
    if app.state.engine_db is None:
        app.state.engine_db = app.state.db.engine_database()
    engine = Engine(settings, app.state.engine_db, app.state.agents, address=address)
    await engine.start()
    app.state.engine = engine
    log.info("workers reach this server at %s", address.socket_path or address.url)
    return engine


async def _take_seat(seat: EngineSeat) -> None:
    """Wait for this host's engine lock, then run the engine. A failure to start stops the server,
    as it would have during start-up: an API whose jobs never run must not look fine."""
    try:
        await seat.run()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("the engine could not start; stopping the server")
        os.kill(os.getpid(), signal.SIGTERM)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    install_log_escaping()  # every process serving the app: uvicorn --workers imports it in each
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
    app.state.mcp_http = McpOverHttp(lambda: current_address(settings) or settings_address(settings))
    app.mount("/mcp", app.state.mcp_http)
    install_observability(app)
    # Size limits before anything reads the request; the security headers on every answer, the
    # limits' 431/413 included.
    app.add_middleware(
        RequestLimitsMiddleware,
        max_header_bytes=settings.orchestrator_max_header_bytes,
        max_body_bytes=settings.orchestrator_max_body_bytes,
    )
    # Outside Starlette's ServerErrorMiddleware too, so even an unexpected 500 carries them.
    build_stack = app.build_middleware_stack
    setattr(app, "build_middleware_stack", lambda: SecurityHeadersMiddleware(build_stack()))  # noqa: B010
    # uvicorn's httptools parser holds all of a request's headers before the app is called: bound
    # it in this process (every server process imports the app). See orchestrator/api/limits.py.
    bound_httptools_headers(settings.orchestrator_max_header_bytes)
    return app


app = create_app()


def export_openapi() -> str:
    """The OpenAPI document as committed in `openapi.json` at the repository root."""
    import json

    return json.dumps(create_app().openapi(), indent=2, sort_keys=False) + "\n"
