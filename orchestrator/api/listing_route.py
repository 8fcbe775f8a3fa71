"""`GET /api/jobs` without FastAPI's dependency solving when nothing needs it.

Once a page is remembered (jobs/pages.py) and its version read without a connection
(db/version_reads.py), solving the route's dependencies (twelve query parameters, the token,
the settings, the session) was most of a request's CPU. The plain case, a user's token and at
most `limit` and `offset` as plain numbers within bounds, is read here directly and answered
with the same body, by the same service; anything else (a worker's token, a filter, a value to
refuse, a token to refuse) goes the full way, which answers or refuses it as it always did.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response

from orchestrator.api.deps import MAX_QUERY_INT, READ_METHODS
from orchestrator.api.paging import DEFAULT_LIMIT, MAX_LIMIT
from orchestrator.api.strict_json import StrictJsonRoute
from orchestrator.core.auth import Actor, Scope, verify_access_token
from orchestrator.core.errors import Unauthorized
from orchestrator.db.session import Database
from orchestrator.jobs import service
from orchestrator.jobs.repository import JobFilter

_BOUNDS = {"limit": (1, MAX_LIMIT), "offset": (0, MAX_QUERY_INT)}
_NO_FILTER = JobFilter()


def plain_window(query: bytes) -> tuple[int, int] | None:
    """`limit` and `offset` of a query string holding nothing else, each at most once, as
    digits within their bounds; None for any other query."""
    window = {"limit": DEFAULT_LIMIT, "offset": 0}
    seen: set[str] = set()
    for part in query.split(b"&") if query else ():
        name, equals, value = part.partition(b"=")
        key = name.decode("latin-1")
        if not equals or key not in _BOUNDS or key in seen or not value.isdigit() or len(value) > 10:
            return None
        seen.add(key)
        number = int(value)
        low, high = _BOUNDS[key]
        if not low <= number <= high:
            return None
        window[key] = number
    return window["limit"], window["offset"]


def plain_user(request: Request) -> Actor | None:
    """The user of a valid `Bearer` token with jobs:read; None for anything else (no header, a
    refused token, a worker's token: the full way says why or confines it)."""
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        claims = verify_access_token(token, request.app.state.settings)
    except Unauthorized:
        return None
    if claims.worker_id is not None or Scope.JOBS_READ not in claims.scopes:
        return None
    return Actor(name=f"user:{claims.user_id}", user_id=claims.user_id)


class ListingRoute(StrictJsonRoute):
    """The jobs list's route: the plain case answered directly (see the module's docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        full = super().get_route_handler()

        async def handler(request: Request) -> Response:
            window = plain_window(request.scope.get("query_string", b""))
            actor = plain_user(request) if window is not None and request.method in READ_METHODS else None
            if window is None or actor is None:
                return await full(request)
            database: Database = request.app.state.db
            async with database.read_session() as session:
                body = await service.list_jobs_json(
                    session, actor, _NO_FILTER, limit=window[0], offset=window[1]
                )
            return Response(body, media_type="application/json")

        return handler
