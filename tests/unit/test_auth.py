"""Tokens: what `create_access_token` signs is what the API verifies, and nothing else is."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
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
from tests.support.servers import TEST_SECRET_KEY, ServerFactory
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


GUIDE_SNIPPET = """
from orchestrator.core.auth import create_access_token
print(create_access_token(user_id="test-user", scopes=["jobs:read"]))
"""


def test_a_token_signed_elsewhere_gets_a_401_that_says_the_key_differs(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """The guide's snippet run from another directory signs with a key generated there; the
    server's 401 says the key is not the server's and how to get a good token, naming no key or
    path. A token made with `orchestrator token` where the server runs is accepted."""
    server = servers.make(ORCHESTRATOR_ENGINE="false")
    del server.env["SECRET_KEY"]  # the server generates and keeps its own key in its data dir
    server.env.pop("ORCHESTRATOR_DATA_DIR")
    server.start()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in server.env.items() if k != "DATABASE_URL"}
    made = subprocess.run(
        [sys.executable, "-c", GUIDE_SNIPPET], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    foreign = made.stdout.strip()
    response = httpx.get(f"{server.url}/api/jobs", headers={"Authorization": f"Bearer {foreign}"})
    assert response.status_code == 401
    detail = response.json()["detail"]
    assert "different key than this server's" in detail and "orchestrator token" in detail
    assert "SECRET_KEY" in detail  # how to share the key, without showing it
    server_key = (server.root / ".orchestrator" / "secret_key").read_text().strip()
    other_key = (elsewhere / ".orchestrator" / "secret_key").read_text().strip()
    for secret in (server_key, other_key, str(server.root), str(elsewhere), "secret_key"):
        assert secret not in detail
    good = subprocess.run(
        [str(Path(sys.executable).parent / "orchestrator"), "token", "-s", "jobs:read"],
        cwd=server.root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    accepted = httpx.get(f"{server.url}/api/jobs", headers={"Authorization": f"Bearer {good.stdout.strip()}"})
    assert accepted.status_code == 200, accepted.text


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
        with pytest.raises(Unauthorized, match="different key"):
            verify_access_token(token)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert verify_access_token(token).user_id == "alice"
