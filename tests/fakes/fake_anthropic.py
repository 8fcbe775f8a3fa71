"""A scriptable fake of the Anthropic Messages API, for running the real ``claude`` CLI offline.

Stdlib only. Usage::

    from tests.fakes.fake_anthropic import FakeAnthropic, text, tool_use, error, fail_first

    script = [tool_use("Write", {"file_path": "/tmp/x/a.txt", "content": "hi"}), text("done")]
    with FakeAnthropic(script) as fake:
        env["ANTHROPIC_BASE_URL"] = fake.url
        ...run claude...
        fake.requests          # every recorded request (RecordedRequest), in arrival order
        fake.main_requests     # only the ones that were answered from the script

How a reply is chosen
---------------------
* A request is a *main-conversation* request when it carries a non-empty ``tools`` list (Claude Code's
  agent loop always sends its tool set). Anything else (a side call such as title/topic generation,
  if the CLI ever makes one) gets a harmless ``text`` answer and does not consume a script step.
  Pass ``is_main=`` to override the rule.
* For a list script, the step is ``script[turn]`` where ``turn`` is the number of ``assistant``
  messages already present in the request (0 for the first request of a conversation). So a
  resumed session or a retried request picks the step for *its* position in the conversation,
  not for the number of HTTP requests seen. Past the end of the list the fake answers
  ``text(EXHAUSTED_TEXT)`` and records the fact in ``fake.problems``.
* A callable script ``script(request_json) -> Step`` decides by itself (``turn_of(body)`` helps).
* ``fail_first(n, script, status=529)`` wraps a script so the first ``n`` main requests fail.

Steps
-----
``text(s)``                      final answer, stop_reason ``end_turn``
``tool_use(name, input)``        one tool call, stop_reason ``tool_use`` (id generated)
``reply(block, block, ...)``     several blocks in one assistant message (e.g. text then tool_use,
                                 or two tool calls); built from ``text_block``/``tool_use_block``
``error(status, body, headers)`` an HTTP error before any streaming (e.g. 529 overloaded)
Every step takes ``delay=`` seconds (sleep before answering) for slow-model / cancellation tests.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes._server import FakeServer

__all__ = [
    "EXHAUSTED_TEXT",
    "SIDE_TEXT",
    "FakeAnthropic",
    "RecordedRequest",
    "Step",
    "error",
    "fail_first",
    "overloaded",
    "rate_limited",
    "reply",
    "text",
    "text_block",
    "tool_result_texts",
    "tool_use",
    "tool_use_block",
    "turn_of",
]

EXHAUSTED_TEXT = "fake-anthropic: script exhausted"
SIDE_TEXT = "fake-anthropic: side request"

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_fake{next(_ids):04d}{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One scripted answer. Either ``blocks`` (a successful assistant message) or ``status`` >= 400."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = "end_turn"
    status: int = 200
    error_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # For errors: answer 200 and start the stream, then send an SSE ``error`` event (as the real API
    # does when it overloads mid-reply) instead of an HTTP error status.
    mid_stream: bool = False
    # Token usage reported for this answer; None = estimated from the request / reply sizes.
    input_tokens: int | None = None
    output_tokens: int | None = None

    @property
    def is_error(self) -> bool:
        return self.status >= 400


def text_block(s: str) -> dict[str, Any]:
    return {"type": "text", "text": s}


def tool_use_block(name: str, input: dict[str, Any] | None = None, id: str | None = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": id or _new_id("toolu"), "name": name, "input": dict(input or {})}


def reply(*blocks: dict[str, Any], stop_reason: str | None = None, delay: float = 0.0, **usage: int) -> Step:
    """An assistant message made of several blocks. stop_reason defaults to tool_use if any block is one."""
    if stop_reason is None:
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return Step(blocks=list(blocks), stop_reason=stop_reason, delay=delay, **usage)


def text(s: str, *, delay: float = 0.0, stop_reason: str = "end_turn", **usage: int) -> Step:
    return Step(blocks=[text_block(s)], stop_reason=stop_reason, delay=delay, **usage)


def tool_use(
    name: str,
    input: dict[str, Any] | None = None,
    *,
    id: str | None = None,
    text: str | None = None,
    delay: float = 0.0,
    **usage: int,
) -> Step:
    """A tool call (optionally preceded by a text block). A fresh id is generated unless given."""
    blocks = [text_block(text)] if text else []
    blocks.append(tool_use_block(name, input, id))
    return Step(blocks=blocks, stop_reason="tool_use", delay=delay, **usage)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error(
    status: int = 529,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    delay: float = 0.0,
    mid_stream: bool = False,
) -> Step:
    """An HTTP error answer. ``body`` defaults to the API's own error shape for that status.

    ``mid_stream=True`` (streaming requests only): HTTP 200, ``message_start``, then an SSE ``error`` event.
    """
    if body is None:
        etype = _ERROR_TYPES.get(status, "api_error")
        body = {"type": "error", "error": {"type": etype, "message": f"fake {etype} ({status})"}}
    return Step(
        status=status, error_body=body, headers=dict(headers or {}), delay=delay, mid_stream=mid_stream
    )


def overloaded(retry_after: float | None = None) -> Step:
    return error(529, headers={"retry-after": str(retry_after)} if retry_after is not None else None)


def rate_limited(retry_after: float | None = None) -> Step:
    return error(429, headers={"retry-after": str(retry_after)} if retry_after is not None else None)


Script = Sequence[Step] | Callable[[dict[str, Any]], Step]


def turn_of(body: dict[str, Any]) -> int:
    """Number of assistant messages already in the request: 0 for the first request of a conversation."""
    return sum(1 for m in body.get("messages") or [] if m.get("role") == "assistant")


def _choose(script: Script, body: dict[str, Any]) -> Step | None:
    if callable(script):
        return script(body)
    turn = turn_of(body)
    if turn < len(script):
        return script[turn]
    return None


def fail_first(
    n: int,
    script: Script = (),
    *,
    status: int = 529,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> Callable[[dict[str, Any]], Step | None]:
    """Wrap ``script`` so that the first ``n`` main requests get ``error(status, ...)``, then continue."""
    lock = threading.Lock()
    seen = [0]
    err = error(status, body, headers)

    def wrapped(req: dict[str, Any]) -> Step | None:
        with lock:
            seen[0] += 1
            k = seen[0]
        if k <= n:
            return err
        return _choose(script, req)

    return wrapped


def tool_result_texts(body: dict[str, Any]) -> list[str]:
    """All tool_result contents of a request, flattened to strings (helps asserting on what tools returned)."""
    out: list[str] = []
    for m in body.get("messages") or []:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "tool_result":
                continue
            c = block.get("content")
            if isinstance(c, str):
                out.append(c)
            elif isinstance(c, list):
                out.append("".join(x.get("text", "") if isinstance(x, dict) else str(x) for x in c))
            else:
                out.append(json.dumps(c))
    return out


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON (dict) or raw text, None for HEAD/GET
    time: float
    kind: str = "other"  # "main", "side", "count_tokens", "probe", "other"
    turn: int | None = None
    status: int = 200  # scripted status (a mid_stream error is recorded as its status though HTTP said 200)
    stream: bool | None = None


def _is_main_default(body: dict[str, Any]) -> bool:
    return bool(body.get("tools"))


def _estimate_tokens(obj: Any) -> int:
    return max(1, len(json.dumps(obj, ensure_ascii=False)) // 4)


class FakeAnthropic(FakeServer[RecordedRequest]):
    """Threaded HTTP server on 127.0.0.1 (ephemeral port) speaking enough of the Messages API."""

    thread_name = "fake-anthropic"

    def __init__(
        self,
        script: Script = (),
        *,
        is_main: Callable[[dict[str, Any]], bool] = _is_main_default,
        side_text: str = SIDE_TEXT,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.script = script
        self.is_main = is_main
        self.side_text = side_text
        super().__init__(_make_handler(self), host, port)

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- inspection --------------------------------------------------------------------------------

    @property
    def message_requests(self) -> list[RecordedRequest]:
        """All POST /v1/messages requests (main and side)."""
        return [r for r in self.requests if r.kind in ("main", "side")]

    @property
    def main_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == "main"]

    # -- answering ---------------------------------------------------------------------------------
    def _step_for(self, rec: RecordedRequest) -> Step:
        body = rec.body if isinstance(rec.body, dict) else {}
        rec.turn = turn_of(body)
        try:
            main = self.is_main(body)
        except Exception as e:
            self.problems.append(f"is_main raised {e!r}")
            main = True
        if not main:
            rec.kind = "side"
            return text(self.side_text)
        rec.kind = "main"
        try:
            step = _choose(self.script, body)
        except Exception as e:
            self.problems.append(f"script raised {e!r}")
            return error(500)
        if step is None:
            self.problems.append(f"script exhausted at turn {rec.turn}")
            return text(EXHAUSTED_TEXT)
        return step


def _make_handler(fake: FakeAnthropic) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fake-anthropic/1"

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        # -- helpers -------------------------------------------------------------------------------
        def _rec(self, body: Any) -> RecordedRequest:
            rec = RecordedRequest(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                time=time.time(),
            )
            return rec

        def _send(
            self, status: int, payload: bytes, content_type: str, extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("request-id", _new_id("req"))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json", extra)

        def _read_body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                return raw.decode("utf-8", "replace")

        # -- verbs ---------------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            rec = self._rec(None)
            rec.kind = "probe"
            fake._record(rec)
            self._send(200, b"", "text/plain")

        def do_GET(self) -> None:
            rec = self._rec(None)
            rec.kind = "probe"
            fake._record(rec)
            self._send_json(200, {"ok": True})

        def do_POST(self) -> None:
            body = self._read_body()
            rec = self._rec(body)
            route = self.path.split("?", 1)[0].rstrip("/")
            if route == "/v1/messages/count_tokens":
                rec.kind = "count_tokens"
                fake._record(rec)
                self._send_json(200, {"input_tokens": _estimate_tokens(body)})
                return
            if route != "/v1/messages" or not isinstance(body, dict):
                rec.kind = "other"
                rec.status = 404
                fake._record(rec)
                self._send_json(
                    404,
                    {"type": "error", "error": {"type": "not_found_error", "message": "fake: no such route"}},
                )
                return
            step = fake._step_for(rec)
            rec.stream = bool(body.get("stream"))
            rec.status = step.status
            fake._record(rec)
            if step.delay:
                time.sleep(step.delay)
            if step.is_error and step.mid_stream and rec.stream:
                start = _message(body, text(""))
                start.update(content=[], stop_reason=None)
                payload = _event("message_start", {"type": "message_start", "message": start}) + _event(
                    "error", step.error_body
                )
                self._send(200, payload.encode(), "text/event-stream; charset=utf-8", step.headers)
                return
            if step.is_error:
                self._send_json(step.status, step.error_body, step.headers)
                return
            message = _message(body, step)
            if rec.stream:
                self._send(
                    200, _sse(message), "text/event-stream; charset=utf-8", {"Cache-Control": "no-cache"}
                )
            else:
                self._send_json(200, message)

        def do_PUT(self) -> None:  # pragma: no cover - not used by the CLI
            self._read_body()
            self._send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": "fake"}})

    return Handler


def _message(req: dict[str, Any], step: Step) -> dict[str, Any]:
    blocks = copy.deepcopy(step.blocks)
    in_tok = (
        step.input_tokens if step.input_tokens is not None else _estimate_tokens(req.get("messages") or [])
    )
    out_tok = step.output_tokens if step.output_tokens is not None else _estimate_tokens(blocks) + 1
    return {
        "id": _new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": req.get("model") or "claude-fake",
        "content": blocks,
        "stop_reason": step.stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": in_tok,
            "output_tokens": out_tok,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "service_tier": "standard",
        },
    }


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _chunks(s: str, size: int = 24) -> Iterable[str]:
    if not s:
        return [""]
    return [s[i : i + size] for i in range(0, len(s), size)]


def _sse(message: dict[str, Any]) -> bytes:
    """The event sequence of the real streaming API for one finished message."""
    usage = message["usage"]
    start = dict(
        message, content=[], stop_reason=None, stop_sequence=None, usage=dict(usage, output_tokens=1)
    )
    out = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("ping", {"type": "ping"}),
    ]
    for i, block in enumerate(message["content"]):
        if block["type"] == "text":
            out.append(
                _event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
            )
            for piece in _chunks(block["text"]):
                out.append(
                    _event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                    )
                )
        elif block["type"] == "tool_use":
            cb = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            out.append(
                _event(
                    "content_block_start", {"type": "content_block_start", "index": i, "content_block": cb}
                )
            )
            for piece in _chunks(json.dumps(block["input"], ensure_ascii=False)):
                out.append(
                    _event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                    )
                )
        else:  # pragma: no cover - only text and tool_use are scripted
            raise ValueError(f"unsupported block type {block['type']!r}")
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    out.append(_event("message_stop", {"type": "message_stop"}))
    return "".join(out).encode()
