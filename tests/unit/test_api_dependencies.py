"""No dependency of any route runs in a worker thread: FastAPI runs a plain `def` dependency in
its thread pool, a thread hop per request for what is an attribute lookup or a few checks of
query parameters (the jobs list's filter and page were two such hops a request)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from orchestrator.api.main import create_app


def _routes(routes: Iterable[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, also those of included routers (FastAPI keeps those as routers)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from _routes(route.original_router.routes)


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for sub in dependant.dependencies:
        yield sub
        yield from _dependencies(sub)


def _runs_on_the_loop(call: Any) -> bool:
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return True
    dunder = getattr(call, "__call__", None)  # noqa: B004 - an instance with an async __call__
    return inspect.iscoroutinefunction(dunder) or inspect.isasyncgenfunction(dunder)


def test_every_dependency_of_every_route_runs_on_the_event_loop() -> None:
    threaded = sorted(
        {
            f"{route.path}: {getattr(sub.call, '__name__', sub.call)!r}"
            for route in _routes(create_app().routes)
            for sub in _dependencies(route.dependant)
            if sub.call is not None and not _runs_on_the_loop(sub.call)
        }
    )
    assert len(list(_routes(create_app().routes))) > 20  # the walk finds the routes
    assert threaded == [], "plain `def` dependencies (each a thread hop a request): make them `async def`"
