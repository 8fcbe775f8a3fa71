"""Probes: no authentication.

`/health` is the liveness probe: the process answers, so it touches no database (a probe every few
seconds from each of many agents must not queue behind database work, and a database outage is
not a reason to restart the API). `/ready` (routers/metrics.py) is the readiness probe: it reads
the database and the engines' heartbeats.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from orchestrator.db.session import Database

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    database: str


@router.get("/health", response_model=Health)
async def health(request: Request) -> Health:
    """Liveness: the API process is serving. The database is named, not queried (see `/ready`)."""
    database: Database = request.app.state.db
    return Health(status="ok", database=database.engine.dialect.name)
