"""Issue 20 item 8: inputs that used to end in a 500 get a clear 4xx.

JSON that Python's parser takes but JSON or this server cannot hold (NaN, Infinity, 1e400, lone
surrogates, duplicate keys, non-UTF-8 bytes, deep nesting), malformed `Last-Event-ID` on either
stream (400 before the stream starts), and correctly signed tokens whose claims have the wrong
type. Raw bytes are sent where a client library would refuse to produce them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from tests.integration.test_engine_lifecycle import submit, wait_final, workers_of
from tests.support.servers import TEST_SECRET_KEY, Server, token


def post_raw(server: Server, body: bytes, path: str = "/api/jobs/submit") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)


def nested(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


BAD_BODIES = {
    "nan": b'{"task_description": "t", "agent_options": {"duration_seconds": NaN}}',
    "infinity": b'{"task_description": "t", "agent_options": {"x": Infinity}}',
    "minus-infinity": b'{"task_description": "t", "agent_options": {"x": [-Infinity]}}',
    "overflowing-float": b'{"task_description": "t", "agent_options": {"x": 1e400}}',
    "float-field-overflow": b'{"task_description": "t", "timeout_seconds": 1e400}',
    "huge-integer": b'{"task_description": "t", "agent_options": {"x": ' + b"9" * 5000 + b"}}",
    "surrogate-in-task": b'{"task_description": "a\\ud800b"}',
    "low-surrogate-in-task": b'{"task_description": "\\udfff"}',
    "surrogate-in-option-value": b'{"task_description": "t", "agent_options": {"x": ["\\ud83d"]}}',
    "surrogate-in-option-key": b'{"task_description": "t", "agent_options": {"\\ud800": 1}}',
    "surrogate-in-agent": b'{"task_description": "t", "agent": "\\udbff"}',
    "duplicate-key": b'{"task_description": "t", "task_description": "u"}',
    "duplicate-option-key": b'{"task_description": "t", "agent_options": {"a": 1, "a": 2}}',
    "latin-1-body": '{"task_description": "caf\u00e9"}'.encode("latin-1"),
    "utf-16-body": '{"task_description": "t"}'.encode("utf-16"),
    "invalid-utf8-in-string": b'{"task_description": "\xff\xfe"}',
    "encoded-surrogate-bytes": b'{"task_description": "\xed\xa0\x80"}',
    "body-nested-65": ('{"task_description": "t", "agent_options": ' + nested(64) + "}").encode(),
    "body-nested-100000": ("[" * 100_000 + "]" * 100_000).encode(),
    "options-nested-33": ('{"task_description": "t", "agent_options": ' + nested(33) + "}").encode(),
    "subtask-options-nested-300": (
        '{"task_description": "t", "agent_options": {"subtasks": [{"task_description": "c", '
        '"agent_options": ' + nested(300) + "}]}}"
    ).encode(),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_json_python_accepts_but_json_does_not_is_422(shared_server: Server, name: str) -> None:
    response = post_raw(shared_server, BAD_BODIES[name])
    assert response.status_code == 422, (name, response.status_code, response.text[:500])
    detail = response.json()["detail"]
    assert detail, response.text
    assert "Traceback" not in shared_server.log()


def test_each_refusal_says_why(shared_server: Server) -> None:
    expected = {
        "nan": "NaN is not a JSON number",
        "overflowing-float": "out of range",
        "surrogate-in-task": "lone surrogate",
        "duplicate-key": "duplicate key 'task_description'",
        "latin-1-body": "not valid UTF-8",
        "body-nested-65": "nested deeper than 64 levels",
        "body-nested-100000": "nested deeper than 64 levels",
        "options-nested-33": "agent_options is nested deeper than 32 levels",
    }
    for name, words in expected.items():
        response = post_raw(shared_server, BAD_BODIES[name])
        assert words in response.text, (name, response.text[:300])
    # Where the parser can tell, the error names the field, as FastAPI's own errors do.
    located = {
        "nan": ["body", "agent_options", "duration_seconds"],
        "float-field-overflow": ["body", "timeout_seconds"],
        "surrogate-in-option-value": ["body", "agent_options", "x", 0],
        "surrogate-in-task": ["body", "task_description"],
    }
    for name, loc in located.items():
        [error] = post_raw(shared_server, BAD_BODIES[name]).json()["detail"]
        assert error["loc"] == loc, (name, error)


def test_the_same_body_on_other_endpoints(shared_server: Server) -> None:
    for path in ("/api/resources/allocate", "/api/resources/release"):
        for body in (b'{"job_id": "\\ud800", "worker_count": 1}', b'{"job_id": "j", "job_id": "k"}'):
            response = post_raw(shared_server, body, path)
            assert response.status_code == 422, (path, body, response.text[:300])


def test_valid_json_is_still_accepted(shared_server: Server) -> None:
    body = {
        "task_description": "caf\u00e9 \U0001f600 \\ud800 as text",
        "agent_options": {"duration_seconds": 0.0},
    }
    response = post_raw(shared_server, json.dumps(body, ensure_ascii=False).encode())
    assert response.status_code == 201, response.text
    # An escaped surrogate pair is a real character; 64 levels of body nesting are fine.
    response = post_raw(shared_server, b'{"task_description": "\\ud83d\\ude00", "agent_options": {}}')
    assert response.status_code == 201, response.text
    assert response.json()["task_description"] == "\U0001f600"
    deep = '{"task_description": "t", "agent": "simulated", "agent_options": ' + nested(32) + "}"
    response = post_raw(shared_server, deep.encode())
    assert response.status_code == 422  # 32 levels pass the depth check; `a` is not an option
    assert "nested deeper" not in response.text


BAD_EVENT_IDS = [
    "\u00b2",
    "1" * 23,
    "9" * 19,
    "garbage",
    "e1-l\u00b2",
    "e" + "1" * 23 + "-l0",
    "-1",
    "e1-l2x",
]


@pytest.fixture(scope="module")
def ended_job(shared_server: Server) -> dict[str, Any]:
    with shared_server.client() as client:
        job = submit(client, task_description="stream me", agent_options={"duration_seconds": 0})
        wait_final(client, job["id"], timeout=60)
        [worker] = workers_of(client, job["id"])
    return {"job": job["id"], "worker": worker["id"]}


def stream_status(server: Server, path: str, last_event_id: str) -> tuple[int, str]:
    """The status and body of a followed stream; the header goes as latin-1 bytes, the way the
    server decodes it ('\u00b2' is the single byte 0xb2, which str.isdigit() takes for a digit)."""
    headers = {
        b"Authorization": f"Bearer {token()}".encode(),
        b"Accept": b"text/event-stream",
        b"Last-Event-ID": last_event_id.encode("latin-1"),
    }
    with httpx.stream("GET", f"{server.url}{path}", headers=headers, timeout=30) as response:
        return response.status_code, response.read().decode(errors="replace")


@pytest.mark.parametrize("last_event_id", BAD_EVENT_IDS)
@pytest.mark.parametrize("stream", ["job", "worker"])
def test_malformed_last_event_id_is_400_before_the_stream(
    shared_server: Server, ended_job: dict[str, Any], stream: str, last_event_id: str
) -> None:
    if stream == "job":
        path = f"/api/jobs/{ended_job['job']}/events?follow=true"
    else:
        path = f"/api/supervisor/workers/{ended_job['worker']}/logs?follow=true"
    status, body = stream_status(shared_server, path, last_event_id)
    assert status == 400, (status, body[:300])
    assert "Last-Event-ID" in json.loads(body)["detail"]


@pytest.mark.parametrize("stream", ["job", "worker"])
def test_well_formed_last_event_ids_still_resume(
    shared_server: Server, ended_job: dict[str, Any], stream: str
) -> None:
    if stream == "job":
        path, good = f"/api/jobs/{ended_job['job']}/events?follow=true", "e0-l0"
    else:
        path, good = f"/api/supervisor/workers/{ended_job['worker']}/logs?follow=true", "0"
    for value in (good, ""):
        status, body = stream_status(shared_server, path, value)
        assert status == 200, (value, body[:300])
        assert "event: end" in body


def signed(**claims: Any) -> str:
    now = datetime.now(UTC)
    payload = {"sub": "u", "scopes": ["jobs:read"], "iat": now, "exp": now + timedelta(minutes=5)}
    payload.update(claims)
    return jwt.encode(payload, TEST_SECRET_KEY, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"wid": 5, "jid": "j_x"},
        {"wid": "w_x", "jid": 7},
        {"wid": ["w_x"], "jid": "j_x"},
        {"wid": {"a": 1}, "jid": "j_x"},
        {"wid": "w_x", "jid": {"id": "j_x"}},
        {"wid": "w_x"},
        {"jid": "j_x"},
        {"wid": "", "jid": ""},
        {"sub": 12},
        {"sub": ["u"]},
        {"sub": {"u": 1}},
        {"scopes": "jobs:read"},
    ],
    ids=lambda c: json.dumps(c),
)
def test_signed_tokens_with_claims_of_the_wrong_type_are_401(shared_server: Server, claims: Any) -> None:
    response = httpx.get(
        f"{shared_server.url}/api/jobs", headers={"Authorization": f"Bearer {signed(**claims)}"}, timeout=30
    )
    assert response.status_code == 401, response.text
    assert response.json()["detail"].startswith("Invalid token")
