"""JSON request bodies as RFC 8259 says, refused with a clear 4xx otherwise.

Python's `json.loads` accepts things JSON does not have, or that this server cannot store or
answer with; each of them used to reach the database or a response encoder and end in a 500:

* `NaN`, `Infinity`, `-Infinity`, and numbers that overflow a float (`1e400` reads as inf);
* lone surrogates (`"\\ud800"`: valid JSON escapes, but no UTF-8 string can hold them);
* bodies that are not UTF-8 (json.loads would also guess UTF-16/32);
* nesting deeper than MAX_DEPTH (64) levels (deeper still, the parser hits Python's recursion
  limit);
* duplicate keys in one object. JSON leaves their meaning open and parsers disagree (first wins,
  last wins, error), so a body that a proxy or a worker's own client reads one way could be acted
  on another way here: refused rather than guessed.

Each is answered 422 in FastAPI's error-list shape, naming what was wrong.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.routing import APIRoute

from orchestrator.api.errors import ERROR_RESPONSES

MAX_DEPTH = 64
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonRefused(ValueError):
    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc


class _Refused:
    """Stands in for a value refused while parsing, so the walk can say where it was."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:  # over Python's digit limit for int()
        raise JsonRefused(f"an integer of {len(text)} digits is out of range") from exc


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonRefused(f"duplicate key {key[:80]!r} in an object")
            seen.add(key)
    return result


def _walk(value: Any, surrogates: bool) -> None:
    """Refused values, depth, and lone surrogates when the body holds such an escape; iterative,
    and it says where the problem is (FastAPI's `loc`)."""
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels")
            for key, child in item.items():
                if surrogates:
                    _check_text(key, path)
                stack.append((child, depth + 1, (*path, key)))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels")
            stack.extend((child, depth + 1, (*path, index)) for index, child in enumerate(item))
        elif isinstance(item, _Refused):
            raise JsonRefused(item.reason, path)
        elif surrogates and isinstance(item, str):
            _check_text(item, path)


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JsonRefused(
            "a string holds a lone surrogate (\\ud800-\\udfff), which is not text", path
        ) from exc


def strict_loads(body: bytes) -> Any:
    """Parse a request body; raise JsonRefused (a ValueError) saying why it is not acceptable."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefused(f"the body is not valid UTF-8 (byte {exc.start})") from exc
    refused = False

    def constant(name: str) -> _Refused:
        nonlocal refused
        refused = True
        return _Refused(f"{name} is not a JSON number")

    def real(text: str) -> float | _Refused:
        nonlocal refused
        value = float(text)
        if math.isfinite(value):
            return value
        refused = True
        return _Refused(f"the number {text[:40]} is out of range")

    try:
        value = json.loads(
            text, parse_constant=constant, parse_float=real, parse_int=_int, object_pairs_hook=_object
        )
    except RecursionError as exc:
        raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels") from exc
    except JsonRefused:
        raise
    except json.JSONDecodeError as exc:
        raise JsonRefused(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    surrogates = _SURROGATE_ESCAPE.search(body) is not None
    if refused or surrogates or body.count(b"[") + body.count(b"{") > MAX_DEPTH:
        _walk(value, surrogates)
    return value


def refusal(exc: JsonRefused) -> HTTPException:
    return HTTPException(
        status_code=422,
        detail=[
            {
                "type": "json_invalid",
                "loc": ["body", *exc.loc],
                "msg": f"Invalid JSON body: {exc}",
                "input": None,
            }
        ],
    )


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = strict_loads(await self.body())
            except JsonRefused as exc:
                raise refusal(exc) from exc
        return self._json


class StrictJsonRoute(APIRoute):
    """An APIRoute whose JSON bodies are read by `strict_loads` (FastAPI's documented way to
    change how a route reads its request)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler


def json_api_router(prefix: str, tag: str) -> APIRouter:
    """A router of the JSON API: its error answers documented, its request bodies read strictly."""
    return APIRouter(prefix=prefix, tags=[tag], responses=ERROR_RESPONSES, route_class=StrictJsonRoute)
