"""Tokens: what `create_access_token` signs is what the API verifies, and nothing else is."""

from __future__ import annotations

import time
import warnings
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from orchestrator.core.auth import (
    ALL_SCOPES,
    create_access_token,
    decode_access_token,
    effective_scopes,
    verify_access_token,
)
from orchestrator.core.config import get_settings
from orchestrator.core.errors import Unauthorized
from tests.support.servers import TEST_SECRET_KEY
from tests.support.wait import wait_until


def test_secret_comes_from_the_environment() -> None:
    assert get_settings().signing_key() == TEST_SECRET_KEY


def test_round_trip() -> None:
    token = create_access_token(user_id="alice", scopes=["jobs:read", "resources:write"])
    claims = decode_access_token(token)
    assert claims.user_id == "alice"
    assert claims.scopes == {"jobs:read", "resources:write", "resources:read"}
    assert claims.worker_id is None and claims.job_id is None and not claims.is_worker
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    raw = jwt.decode(token, TEST_SECRET_KEY, algorithms=["HS256"])
    assert raw["scopes"] == ["jobs:read", "resources:write"]
    assert raw["exp"] - raw["iat"] == 30 * 60


def test_guide_call_with_all_six_scopes() -> None:
    token = create_access_token(
        user_id="test-user",
        scopes=[
            "supervisor:read",
            "supervisor:write",
            "jobs:read",
            "jobs:write",
            "resources:read",
            "resources:write",
        ],
    )
    assert decode_access_token(token).scopes == frozenset(ALL_SCOPES)


def test_worker_claims_round_trip() -> None:
    token = create_access_token("bob", ["jobs:write"], worker_id="w_0123456789ab", job_id="j_0123456789ab")
    claims = decode_access_token(token)
    assert claims.is_worker and claims.worker_id == "w_0123456789ab" and claims.job_id == "j_0123456789ab"


def test_expires_delta() -> None:
    token = create_access_token("alice", ["jobs:read"], expires_delta=timedelta(minutes=2))
    raw = jwt.decode(token, TEST_SECRET_KEY, algorithms=["HS256"])
    assert raw["exp"] - raw["iat"] == 120
    assert abs(raw["iat"] - time.time()) < 10


def test_expired_token_is_refused() -> None:
    token = create_access_token("alice", ["jobs:read"], expires_delta=timedelta(seconds=-1))
    with pytest.raises(Unauthorized, match="expired") as caught:
        decode_access_token(token)
    assert caught.value.status_code == 401


@pytest.mark.parametrize("scopes", [["jobs:delete"], ["jobs:read", "admin"], ["JOBS:READ"], [""]])
def test_unknown_scope_is_a_value_error(scopes: list[str]) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        create_access_token("alice", scopes)


@pytest.mark.parametrize(
    ("granted", "effective"),
    [
        (["jobs:write"], {"jobs:write", "jobs:read"}),
        (["supervisor:write"], {"supervisor:write", "supervisor:read"}),
        (["resources:write", "jobs:read"], {"resources:write", "resources:read", "jobs:read"}),
        (["jobs:read"], {"jobs:read"}),
        ([], set()),
    ],
)
def test_write_implies_read_but_not_the_reverse(granted: list[str], effective: set[str]) -> None:
    assert effective_scopes(granted) == effective
    assert decode_access_token(create_access_token("alice", granted)).scopes == effective


def _claims(**extra: object) -> dict[str, object]:
    now = datetime.now(UTC)
    return {"sub": "alice", "scopes": ALL_SCOPES, "iat": now, "exp": now + timedelta(minutes=5), **extra}


def _hs512_same_key() -> str:
    with warnings.catch_warnings():  # the suite's key is short for HS512; that is not the point here
        warnings.simplefilter("ignore")
        return jwt.encode(_claims(), TEST_SECRET_KEY, algorithm="HS512")


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(jwt.encode(_claims(), None, algorithm="none"), id="alg-none"),
        pytest.param(
            jwt.encode(_claims(), "another-secret-key-0123456789abcdef", algorithm="HS256"), id="wrong-key"
        ),
        pytest.param(_hs512_same_key(), id="other-alg-same-key"),
        pytest.param(jwt.encode({"sub": "alice", "scopes": ALL_SCOPES}, TEST_SECRET_KEY), id="no-exp"),
        pytest.param(
            jwt.encode({"scopes": ALL_SCOPES, "exp": _claims()["exp"]}, TEST_SECRET_KEY), id="no-sub"
        ),
        pytest.param(jwt.encode(_claims(sub=""), TEST_SECRET_KEY), id="empty-sub"),
        pytest.param(jwt.encode(_claims(scopes="jobs:read"), TEST_SECRET_KEY), id="scopes-not-a-list"),
        pytest.param("not.a.jwt", id="garbage"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_tokens_are_unauthorized(token: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        decode_access_token(token)
    assert caught.value.status_code == 401 and caught.value.detail


def test_tampered_payload_is_refused() -> None:
    token = create_access_token("alice", ["jobs:read"])
    header, _, signature = token.split(".")
    forged_payload = jwt.encode(_claims(), "x" * 40).split(".")[1]
    with pytest.raises(Unauthorized):
        decode_access_token(f"{header}.{forged_payload}.{signature}")


def test_a_remembered_token_still_expires() -> None:
    """verify_access_token remembers a verified token, but never past the token's own expiry."""
    token = create_access_token(user_id="brief", scopes=["jobs:read"], expires_delta=timedelta(seconds=2))
    assert verify_access_token(token).user_id == "brief"  # verified and remembered
    assert verify_access_token(token).user_id == "brief"  # from memory

    def expired() -> bool:
        try:
            verify_access_token(token)
        except Unauthorized as exc:
            return str(exc) == "Token has expired"
        return False

    wait_until(expired, timeout=30, interval=0.2, what="the remembered token to expire")


def test_a_remembered_token_is_not_trusted_under_another_key(monkeypatch: pytest.MonkeyPatch) -> None:
    token = create_access_token(user_id="alice", scopes=["jobs:read"])
    assert verify_access_token(token).user_id == "alice"
    monkeypatch.setenv("SECRET_KEY", "another-key-entirely-0123456789abcdefghij")
    get_settings.cache_clear()
    try:
        with pytest.raises(Unauthorized, match="Signature verification failed"):
            verify_access_token(token)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert verify_access_token(token).user_id == "alice"
