"""Probes: no authentication.

`/health` is the liveness probe: the process answers, so it touches no database (a probe every few
seconds from each of many agents must not queue behind database work, and a database outage is
not a reason to restart the API). `/ready` is the readiness probe: one read-only statement
through the pool, 503 when the database does not answer.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.core.errors import ServiceUnavailable
from orchestrator.db.session import Database

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


class Health(BaseModel):
    status: str
    database: str


@router.get("/health", response_model=Health)
async def health(request: Request) -> Health:
    """Liveness: the API process is serving. The database is named, not queried (see `/ready`)."""
    database: Database = request.app.state.db
    return Health(status="ok", database=database.engine.dialect.name)


@router.get(
    "/ready",
    response_model=Health,
    responses={503: {"description": "The database does not answer", "content": {"application/json": {}}}},
)
async def ready(request: Request) -> Health:
    """Readiness: the database answers a query."""
    database: Database = request.app.state.db
    try:
        async with database.read_session() as session:
            await session.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as exc:
        log.warning("readiness check failed: %s", exc)
        raise ServiceUnavailable(f"Database unavailable: {exc.__class__.__name__}") from exc
    return Health(status="ready", database=database.engine.dialect.name)
