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

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

MAX_DEPTH = 64
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonRefused(ValueError):
    pass


def _constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused(f"number {text[:40]} is out of range")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:  # over Python's digit limit for int()
        raise JsonRefused(f"integer of {len(text)} digits is out of range") from exc


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonRefused(f"duplicate key {key[:80]!r} in an object")
            seen.add(key)
    return result


def _check(value: Any, surrogates: bool) -> None:
    """Depth, and lone surrogates when the body holds such an escape (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels")
            if surrogates:
                for key in item:
                    _check_text(key)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels")
            stack.extend((v, depth + 1) for v in item)
        elif surrogates and isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JsonRefused("a string holds a lone surrogate (\\ud800-\\udfff), which is not text") from exc


def strict_loads(body: bytes) -> Any:
    """Parse a request body; raise JsonRefused (a ValueError) saying why it is not acceptable."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefused(f"the body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        value = json.loads(
            text, parse_constant=_constant, parse_float=_float, parse_int=_int, object_pairs_hook=_object
        )
    except RecursionError as exc:
        raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels") from exc
    except JsonRefused:
        raise
    except json.JSONDecodeError as exc:
        raise JsonRefused(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    surrogates = _SURROGATE_ESCAPE.search(body) is not None
    if surrogates or body.count(b"[") + body.count(b"{") > MAX_DEPTH:
        _check(value, surrogates)
    return value


def refusal(exc: JsonRefused) -> HTTPException:
    return HTTPException(
        status_code=422,
        detail=[{"type": "json_invalid", "loc": ["body"], "msg": f"Invalid JSON body: {exc}", "input": None}],
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
