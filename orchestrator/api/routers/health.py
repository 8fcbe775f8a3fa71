"""Probes: no authentication.

`/health` is the liveness probe: the process answers, so it touches no database (a probe every few
seconds from each of many agents must not queue behind database work, and a database outage is
not a reason to restart the API). `/ready` (routers/metrics.py) is the readiness probe: it reads
the database and the engines' heartbeats.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from orchestrator.db.session import Database

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    database: str


async def health(request: Request) -> Health:
    """Liveness: the API process is serving. The database is named, not queried (see `/ready`)."""
    database: Database = request.app.state.db
    return Health(status="ok", database=database.engine.dialect.name)


class HealthRoute(APIRoute):
    """`/health` answered with the body `health` gave, kept per database: the answer only
    changes with the database (its kind), and a probe that many agents poll should cost what
    the framework costs, not dependency solving and a model's serialisation each time. The
    route, its schema and its answer stay those of `health`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        answered: tuple[object, bytes] | None = None

        async def handler(request: Request) -> Response:
            nonlocal answered
            database = request.app.state.db
            if answered is None or answered[0] is not database:
                answered = (database, (await health(request)).model_dump_json().encode())
            return Response(answered[1], media_type="application/json")

        return handler


router.add_api_route(
    "/health", health, methods=["GET"], response_model=Health, route_class_override=HealthRoute
)
