"""A scriptable fake of the OpenAI Responses API, for running the real ``codex`` CLI offline.

Stdlib only. Usage::

    from tests.fakes.fake_openai_responses import FakeOpenAIResponses, text, exec_command, error

    script = [exec_command("echo hi > made.txt"), text("done")]
    with FakeOpenAIResponses(script) as fake:
        codex ... -c 'model_providers.fake={name="fake",base_url="<fake.url>",
                      env_key="OPENAI_API_KEY",wire_api="responses"}' -c model_provider=fake ...
        fake.requests            # every recorded request (RecordedRequest), in arrival order
        fake.response_requests   # only the POST /v1/responses ones

How a reply is chosen
---------------------
* Every ``POST /v1/responses`` is answered from the script. For a list script the step is
  ``script[turn]`` where ``turn`` is the number of model turns already present in the request's
  ``input`` (``turn_of``): a run of consecutive model-output items (assistant ``message``,
  ``function_call``, ``reasoning``) counts as one turn. So a retried request picks the step for *its*
  position in the conversation. Past the end of the list the fake answers ``text(EXHAUSTED_TEXT)``
  and records the fact in ``fake.problems``.
* A callable script ``script(request_json) -> Step`` decides by itself (``turn_of(body)`` helps).
* Other routes: ``GET /v1/models`` lists no models; anything else is a 404 in the API's error shape.

Steps
-----
``text(s)``                        a final assistant message
``function_call(name, arguments)`` one tool call (Codex's shell tool: ``exec_command(cmd)``)
``reply(item, item, ...)``         several output items in one response (``message_item``,
                                   ``function_call_item``)
``error(status, body, headers)``   an HTTP error before any streaming (401, 429, 500, ...)
Every step takes ``delay=`` seconds and ``input_tokens=`` / ``output_tokens=`` for its usage.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes._server import FakeServer

__all__ = [
    "EXHAUSTED_TEXT",
    "FakeOpenAIResponses",
    "RecordedRequest",
    "Step",
    "error",
    "exec_command",
    "function_call",
    "function_call_item",
    "function_outputs",
    "message_item",
    "rate_limited",
    "reply",
    "text",
    "turn_of",
]

EXHAUSTED_TEXT = "fake-openai: script exhausted"

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_fake{next(_ids):04d}{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One scripted answer: output ``items`` (a successful response) or an HTTP ``status`` >= 400."""

    items: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    error_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    input_tokens: int | None = None
    output_tokens: int | None = None

    @property
    def is_error(self) -> bool:
        return self.status >= 400


def message_item(s: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": _new_id("msg"),
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": s, "annotations": []}],
    }


def function_call_item(
    name: str, arguments: dict[str, Any] | None = None, call_id: str | None = None
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": _new_id("fc"),
        "call_id": call_id or _new_id("call"),
        "name": name,
        "arguments": json.dumps(arguments or {}),
        "status": "completed",
    }


def reply(
    *items: dict[str, Any],
    delay: float = 0.0,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> Step:
    return Step(
        items=[copy.deepcopy(i) for i in items],
        delay=delay,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


def text(
    s: str, *, delay: float = 0.0, input_tokens: int | None = None, output_tokens: int | None = None
) -> Step:
    return reply(message_item(s), delay=delay, input_tokens=input_tokens, output_tokens=output_tokens)


def function_call(
    name: str,
    arguments: dict[str, Any] | None = None,
    *,
    text: str | None = None,
    delay: float = 0.0,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> Step:
    """A tool call (optionally preceded by a message). A fresh call id is generated."""
    items = [message_item(text)] if text else []
    items.append(function_call_item(name, arguments))
    return reply(*items, delay=delay, input_tokens=input_tokens, output_tokens=output_tokens)


def exec_command(
    cmd: str, *, delay: float = 0.0, input_tokens: int | None = None, output_tokens: int | None = None
) -> Step:
    """Codex's shell tool: run ``cmd`` (in the session's working directory)."""
    return function_call(
        "exec_command", {"cmd": cmd}, delay=delay, input_tokens=input_tokens, output_tokens=output_tokens
    )


_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    503: ("server_error", "server_overloaded"),
}


def error(
    status: int = 500,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    delay: float = 0.0,
) -> Step:
    """An HTTP error answer; ``body`` defaults to the API's own error shape for that status."""
    if body is None:
        etype, code = _ERRORS.get(status, ("server_error", "server_error"))
        message = f"fake {code} ({status})"
        if status == 401:
            message = "Incorrect API key provided: test-key. (fake)"
        body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return Step(status=status, error_body=body, headers=dict(headers or {}), delay=delay)


def rate_limited(retry_after: float | None = None) -> Step:
    return error(429, headers={"retry-after": str(retry_after)} if retry_after is not None else None)


Script = Sequence[Step] | Callable[[dict[str, Any]], Step]

_MODEL_ITEMS = frozenset({"function_call", "reasoning", "custom_tool_call", "local_shell_call"})


def _is_model_item(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    if kind in _MODEL_ITEMS:
        return True
    return bool(item.get("role") == "assistant" and kind in (None, "message"))


def turn_of(body: dict[str, Any]) -> int:
    """Model turns already in the request's ``input``: 0 for the first request of a conversation."""
    items = body.get("input")
    if not isinstance(items, list):
        return 0
    turns, inside = 0, False
    for item in items:
        model = _is_model_item(item)
        if model and not inside:
            turns += 1
        inside = model
    return turns


def function_outputs(body: dict[str, Any]) -> list[str]:
    """The outputs of every ``function_call_output`` item of a request, as strings."""
    out: list[str] = []
    for item in body.get("input") or []:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            value = item.get("output")
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, list):
                out.append("".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in value))
            else:
                out.append(json.dumps(value))
    return out


def _choose(script: Script, body: dict[str, Any]) -> Step | None:
    if callable(script):
        return script(body)
    turn = turn_of(body)
    return script[turn] if turn < len(script) else None


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON (dict) or raw text, None without a body
    time: float
    kind: str = "other"  # "responses", "models", "other"
    turn: int | None = None
    status: int = 200


def _estimate_tokens(obj: Any) -> int:
    return max(1, len(json.dumps(obj, ensure_ascii=False)) // 4)


class FakeOpenAIResponses(FakeServer[RecordedRequest]):
    """Threaded HTTP server on 127.0.0.1 (ephemeral port) speaking enough of the Responses API."""

    thread_name = "fake-openai"

    def __init__(self, script: Script = (), *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.script = script
        super().__init__(_make_handler(self), host, port)

    @property
    def url(self) -> str:
        """The provider base URL (Codex appends ``/responses``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def response_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == "responses"]

    def _step_for(self, rec: RecordedRequest) -> Step:
        body = rec.body if isinstance(rec.body, dict) else {}
        rec.turn = turn_of(body)
        try:
            step = _choose(self.script, body)
        except Exception as e:
            self.problems.append(f"script raised {e!r}")
            return error(500)
        if step is None:
            self.problems.append(f"script exhausted at turn {rec.turn}")
            return text(EXHAUSTED_TEXT)
        return step


def _make_handler(fake: FakeOpenAIResponses) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fake-openai/1"

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def _rec(self, body: Any) -> RecordedRequest:
            return RecordedRequest(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                time=time.time(),
            )

        def _send(
            self, status: int, payload: bytes, content_type: str, extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("x-request-id", _new_id("req"))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json", extra)

        def _not_found(self) -> None:
            body = {
                "error": {"message": "fake: no such route", "type": "invalid_request_error", "code": None}
            }
            self._send_json(404, body)

        def _read_body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                return raw.decode("utf-8", "replace")

        def do_GET(self) -> None:
            rec = self._rec(None)
            route = self.path.split("?", 1)[0].rstrip("/")
            if route == "/v1/models":
                rec.kind = "models"
                fake._record(rec)
                self._send_json(200, {"object": "list", "data": [], "models": []})
                return
            rec.status = 404
            fake._record(rec)
            self._not_found()

        def do_POST(self) -> None:
            body = self._read_body()
            rec = self._rec(body)
            route = self.path.split("?", 1)[0].rstrip("/")
            if route != "/v1/responses" or not isinstance(body, dict):
                rec.status = 404
                fake._record(rec)
                self._not_found()
                return
            rec.kind = "responses"
            step = fake._step_for(rec)
            rec.status = step.status
            fake._record(rec)
            if step.delay:
                time.sleep(step.delay)
            if step.is_error:
                self._send_json(step.status, step.error_body, step.headers)
                return
            payload = _sse(_response(body, step))
            self._send(200, payload, "text/event-stream; charset=utf-8", {"Cache-Control": "no-cache"})

    return Handler


def _response(req: dict[str, Any], step: Step) -> dict[str, Any]:
    items = copy.deepcopy(step.items)
    in_tok = step.input_tokens if step.input_tokens is not None else _estimate_tokens(req.get("input") or [])
    out_tok = step.output_tokens if step.output_tokens is not None else _estimate_tokens(items) + 1
    return {
        "id": _new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": req.get("model") or "gpt-fake",
        "output": items,
        "usage": {
            "input_tokens": in_tok,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out_tok,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": in_tok + out_tok,
        },
    }


def _event(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _chunks(s: str, size: int = 24) -> Iterable[str]:
    return [s[i : i + size] for i in range(0, len(s), size)] or [""]


def _sse(response: dict[str, Any]) -> bytes:
    """The event sequence of the real streaming API for one finished response."""
    start = dict(response, status="in_progress", output=[], usage=None)
    out = [_event({"type": "response.created", "response": start})]
    for index, item in enumerate(response["output"]):
        if item["type"] == "message":
            opened = dict(item, status="in_progress", content=[])
            out.append(_event({"type": "response.output_item.added", "output_index": index, "item": opened}))
            for part_index, part in enumerate(item["content"]):
                for piece in _chunks(part.get("text", "")):
                    delta = {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": part_index,
                        "delta": piece,
                    }
                    out.append(_event(delta))
        else:
            opened = dict(item, status="in_progress")
            if "arguments" in opened:
                opened["arguments"] = ""
            out.append(_event({"type": "response.output_item.added", "output_index": index, "item": opened}))
        out.append(_event({"type": "response.output_item.done", "output_index": index, "item": item}))
    out.append(_event({"type": "response.completed", "response": response}))
    return "".join(out).encode()
