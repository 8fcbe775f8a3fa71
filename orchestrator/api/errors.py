"""One place maps errors to `{"detail": ...}` responses; nothing escapes as a bare 500."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from orchestrator.core.errors import DomainError, FieldInvalid, Forbidden, Unauthorized
from orchestrator.db.availability import OUTAGES, database_unavailable

log = logging.getLogger(__name__)


class ErrorOut(BaseModel):
    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "Missing, malformed, expired or wrongly signed token"},
    403: {"model": ErrorOut, "description": "The token lacks a required scope"},
}
NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorOut, "description": "Not found"}}
BAD_REQUEST: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorOut, "description": "Invalid state transition or request"}
}


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    headers: dict[str, str] = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, Forbidden):
        headers["WWW-Authenticate"] = 'Bearer error="insufficient_scope"'
    if isinstance(exc, FieldInvalid):
        return JSONResponse({"detail": exc.as_detail()}, status_code=422)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


def _json_safe(value: object) -> object:
    """JSON has no NaN or Infinity, but Python's parser accepts them in a request body."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's standard 422 list, made safe to render whatever the body held."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Unreachable, restarting, dropped, full, refusing connections, timing out, or every pooled
    connection busy: a failure the client can wait out (Retry-After) and is told which, never a
    500. The server log says it once per outage (db/availability.py), not once per request."""
    failure = OUTAGES.report(exc, "api")
    if failure is None:  # an OperationalError that is a bug (SQLite's "no such table", ...)
        return await _unexpected(request, exc)
    return JSONResponse(
        {"detail": failure.detail},
        status_code=503,
        headers={"Retry-After": str(failure.retry_after)},
    )


def _conflict() -> JSONResponse:
    return JSONResponse({"detail": "Conflicting concurrent change; try again"}, status_code=409)


async def _integrity(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("integrity error: %s", exc)
    return _conflict()


# PostgreSQL gave up one of two transactions: a deadlock, or a serialization failure. The other
# went through; repeating the request is safe because the rolled-back one wrote nothing.
TRANSACTION_CONFLICTS = frozenset({"40P01", "40001"})


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if database_unavailable(exc):  # a connection the server dropped, its shutdown, a timeout, ...
        return await _database_unavailable(request, exc)
    if getattr(getattr(exc, "orig", None), "sqlstate", None) in TRANSACTION_CONFLICTS:
        log.warning("transaction conflict: %s", exc)
        return _conflict()
    return await _unexpected(request, exc)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return JSONResponse({"detail": "Internal server error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    app.add_exception_handler(IntegrityError, _integrity)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
