"""JWT bearer tokens and scopes.

A token names a user (`sub`) and its scopes. A worker's delegated token also names the worker and
the job whose subtree it may act on; the API checks those claims on every request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import jwt

from orchestrator.core.config import Settings, get_settings
from orchestrator.core.errors import Unauthorized


class Scope(StrEnum):
    SUPERVISOR_READ = "supervisor:read"
    SUPERVISOR_WRITE = "supervisor:write"
    JOBS_READ = "jobs:read"
    JOBS_WRITE = "jobs:write"
    RESOURCES_READ = "resources:read"
    RESOURCES_WRITE = "resources:write"


ALL_SCOPES: list[str] = [s.value for s in Scope]

SCOPE_DESCRIPTIONS: dict[str, str] = {
    Scope.SUPERVISOR_READ: "Read worker status and metrics",
    Scope.SUPERVISOR_WRITE: "Control workers (pause/resume/terminate)",
    Scope.JOBS_READ: "View job details and status",
    Scope.JOBS_WRITE: "Submit and cancel jobs",
    Scope.RESOURCES_READ: "View resource quotas and usage",
    Scope.RESOURCES_WRITE: "Allocate and release resources",
}


def effective_scopes(granted: list[str]) -> frozenset[str]:
    """A `:write` scope implies the `:read` scope of the same area.

    The guide's manual testing script reads quotas with a token holding `resources:write` only.
    """
    result = set(granted)
    for scope in granted:
        area, _, level = scope.partition(":")
        if level == "write":
            result.add(f"{area}:read")
    return frozenset(result)


@dataclass(frozen=True)
class TokenClaims:
    user_id: str
    scopes: frozenset[str]
    worker_id: str | None = None
    job_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def is_worker(self) -> bool:
        return self.worker_id is not None


# A token made where the server's key is not (another directory's generated key, another
# SECRET_KEY) fails here; the reason says so without naming the key or where it is kept.
WRONG_KEY = (
    "Invalid token: it was signed with a different key than this server's. Make tokens with the "
    "server's key: run `orchestrator token` on the server host with the same SECRET_KEY (or, "
    "without SECRET_KEY, from the same directory / ORCHESTRATOR_DATA_DIR as the server), or "
    "call create_access_token() there"
)


def create_access_token(
    user_id: str,
    scopes: list[str],
    expires_delta: timedelta | None = None,
    *,
    worker_id: str | None = None,
    job_id: str | None = None,
    settings: Settings | None = None,
) -> str:
    """Sign a token for `user_id` with `scopes` (HS256 by default, key from SECRET_KEY).

    `settings`: the server's; the process-wide settings when omitted (the CLI's `token` command)."""
    settings = settings or get_settings()
    unknown = sorted(set(scopes) - set(ALL_SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s): {', '.join(unknown)}; known: {', '.join(ALL_SCOPES)}")
    now = datetime.now(UTC)
    expires = now + (expires_delta or timedelta(minutes=settings.access_token_expire_minutes))
    payload: dict[str, Any] = {"sub": user_id, "scopes": list(scopes), "iat": now, "exp": expires}
    if worker_id is not None:
        payload["wid"] = worker_id
    if job_id is not None:
        payload["jid"] = job_id
    return jwt.encode(payload, settings.signing_key(), algorithm=settings.algorithm)


def decode_access_token(token: str, settings: Settings | None = None) -> TokenClaims:
    """Verify signature, algorithm and expiry; raise Unauthorized with a reason otherwise."""
    settings = settings or get_settings()
    try:
        payload = jwt.decode(
            token,
            settings.signing_key(),
            algorithms=[settings.algorithm],
            options={"require": ["sub", "exp"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("Token has expired") from exc
    except jwt.InvalidSignatureError as exc:
        raise Unauthorized(WRONG_KEY) from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"Invalid token: {exc}") from exc
    scopes = payload.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise Unauthorized("Invalid token: 'scopes' must be a list of strings")
    sub = payload["sub"]
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("Invalid token: 'sub' must be a non-empty string")
    worker_id, job_id = payload.get("wid"), payload.get("jid")
    # A worker token names both its worker and its job, as strings; anything else (a number, a
    # list, an object, one without the other) is not a token this server signs.
    for name, value in (("wid", worker_id), ("jid", job_id)):
        if value is not None and (not isinstance(value, str) or not value):
            raise Unauthorized(f"Invalid token: '{name}' must be a non-empty string")
    if (worker_id is None) != (job_id is None):
        raise Unauthorized("Invalid token: a worker token needs both 'wid' and 'jid'")
    return TokenClaims(
        user_id=sub,
        scopes=effective_scopes(scopes),
        worker_id=worker_id,
        job_id=job_id,
        raw=payload,
    )


# Verified tokens by their text: agents send the same token on every call, and verifying it again
# (HMAC, JSON, claims checks, the stored key's file when SECRET_KEY is unset) is most of the CPU
# of a small authenticated request. An entry is used only with the same Settings object (a new
# key means a new Settings), only before the token's own expiry, and for at most a minute.
_VERIFIED: dict[str, tuple[Settings, float, TokenClaims]] = {}
_VERIFIED_MAX = 4096
_VERIFIED_SECONDS = 60.0


def verify_access_token(token: str, settings: Settings | None = None) -> TokenClaims:
    """`decode_access_token`, remembered for a while per token (see _VERIFIED)."""
    settings = settings or get_settings()
    now = time.time()
    hit = _VERIFIED.get(token)
    if hit is not None and hit[0] is settings and now < hit[1]:
        return hit[2]
    claims = decode_access_token(token, settings)
    exp = claims.raw.get("exp")
    until = now + _VERIFIED_SECONDS
    if isinstance(exp, int | float):
        until = min(until, float(exp))
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[token] = (settings, until, claims)
    return claims


@dataclass(frozen=True)
class Actor:
    """Who is acting, and the subtree a worker's delegated token confines it to."""

    name: str
    user_id: str
    worker_id: str | None = None
    worker_job_id: str | None = None
    subtree_path: str | None = None

    @property
    def is_worker(self) -> bool:
        return self.worker_id is not None

    def can_see(self, job_path: str) -> bool:
        return self.subtree_path is None or job_path.startswith(self.subtree_path)


def engine_actor(engine_id: str) -> Actor:
    return Actor(name=f"engine:{engine_id}", user_id="system")
