"""Request size limits, applied before anything reads, parses or authenticates a request.

* Request line + headers over `ORCHESTRATOR_MAX_HEADER_BYTES` (64 KiB): 431.
* A body over `ORCHESTRATOR_MAX_BODY_BYTES` (2 MiB): 413, announced (`Content-Length`) or
  chunked; the connection is closed after the answer, so the rest is never read.

Why two places for the header limit: by the time an ASGI middleware sees a request, the server has
already parsed and stored all of its headers. uvicorn's h11 parser bounds that (16 KiB by default,
answered 400), but its httptools parser (the one `uvicorn orchestrator.api.main:app` picks when
`uvicorn[standard]` is installed) buffers headers without any bound: 100 MB of headers used to be
read into memory before the app was even called. So `bound_httptools_headers` (called when this
module is imported, i.e. in every process that imports the app: `--workers N`, gunicorn workers,
`orchestrator serve`) counts the bytes httptools is fed until a request's headers are complete,
and answers 431 and closes the connection once they pass the limit. That patches uvicorn
internals; if uvicorn changes them, a warning is logged and only the ASGI check below remains.
The middleware checks the same limit for every other server.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.security_headers import API_CSP, COMMON_HEADERS

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def header_detail(limit: int) -> str:
    return f"Request line and headers exceed the limit of {limit} bytes (ORCHESTRATOR_MAX_HEADER_BYTES)"


def body_detail(limit: int) -> str:
    return f"Request body exceeds the limit of {limit} bytes (ORCHESTRATOR_MAX_BODY_BYTES)"


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a chunked body passes the limit; FastAPI's body reader lets an
    HTTPException through, so it becomes a 413 `{"detail": ...}` before any parsing."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, body_detail(limit), headers={"Connection": "close"})


async def _reject(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimitsMiddleware:
    """431 / 413 before the app sees the request (pure ASGI: streams are not buffered)."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if size > self.max_header_bytes:
            await _reject(send, 431, header_detail(self.max_header_bytes))
            return
        limit = self.max_body_bytes
        if length is not None:
            # The server stops at Content-Length (and refuses a malformed one): nothing to count.
            if not length.isdigit() or int(length) > limit:
                await _reject(send, 413, body_detail(limit))
                return
            await self.app(scope, receive, send)
            return
        if not chunked:
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


_COUNTED = "_orchestrator_header_bytes"  # bytes fed since this request began; None once its headers are in
_REFUSED = "_orchestrator_refused"


_PATCHED = ("data_received", "on_headers_complete", "on_body", "on_message_complete", "send_400_response")


def _httptools_protocol() -> type[HttpToolsProtocol] | None:
    """uvicorn's httptools protocol class, or None when it is not installed or no longer has the
    methods patched below."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as protocol
    except ImportError:  # httptools not installed: uvicorn uses h11, which has its own bound
        return None
    if not all(callable(getattr(protocol, name, None)) for name in _PATCHED):
        log.warning("uvicorn's httptools protocol changed: request headers are bounded only after parsing")
        return None
    return protocol


def _refuse(self: Any) -> None:
    """Answer 431 on an httptools protocol instance and close its connection (once)."""
    if getattr(self, _REFUSED, False):
        return
    setattr(self, _REFUSED, True)
    transport = self.transport
    if transport.is_closing():
        return
    detail = json.dumps({"detail": header_detail(self.header_limit)}).encode()
    head = [b"HTTP/1.1 431 Request Header Fields Too Large"]
    head += [b"content-type: application/json", b"connection: close"]
    head += [f"content-length: {len(detail)}".encode()]
    head += [f"{k}: {v}".encode("latin-1") for k, v in COMMON_HEADERS.items()]
    head += [b"content-security-policy: " + API_CSP.encode()]
    transport.write(b"\r\n".join(head) + b"\r\n\r\n" + detail)
    transport.close()
    self.logger.warning("Request line and headers over %d bytes: answered 431", self.header_limit)


def bound_httptools_headers(limit: int) -> bool:
    """Bound what uvicorn's httptools protocol buffers for one request's line and headers.

    Two checks: bytes fed to the parser while a request's headers are incomplete (so one header
    that never ends is stopped after at most one read past the limit), and the request line plus
    parsed headers when they complete (exact, for a request that arrives in one read). Either
    answers 431, closes the connection, and has the protocol ignore the rest of it."""
    protocol = _httptools_protocol()
    if protocol is None:
        return False
    protocol.header_limit = limit  # type: ignore[attr-defined]
    if getattr(protocol, "_orchestrator_bounded", False):
        return True
    data_received, on_headers_complete, on_body, on_message_complete, send_400_response = (
        getattr(protocol, name) for name in _PATCHED
    )

    def bounded_data_received(self: Any, data: bytes) -> None:
        if getattr(self, _REFUSED, False):
            return
        counted = getattr(self, _COUNTED, 0)
        if counted is None:  # in a body, which the middleware bounds
            data_received(self, data)
            return
        counted += len(data)
        setattr(self, _COUNTED, counted)
        data_received(self, data)
        # Still the same request's headers (not completed, nor a next request begun meanwhile).
        if getattr(self, _COUNTED, 0) == counted > self.header_limit:
            _refuse(self)

    def bounded_on_headers_complete(self: Any) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.header_limit:
            _refuse(self)
            return
        setattr(self, _COUNTED, None)
        on_headers_complete(self)

    def bounded_on_body(self: Any, body: bytes) -> None:
        if not getattr(self, _REFUSED, False):
            on_body(self, body)

    def bounded_on_message_complete(self: Any) -> None:
        if getattr(self, _REFUSED, False):
            return
        setattr(self, _COUNTED, 0)  # the next request on this connection starts counting
        on_message_complete(self)

    def bounded_send_400_response(self: Any, msg: str) -> None:
        if not getattr(self, _REFUSED, False):  # the 431 is already on its way
            send_400_response(self, msg)

    protocol.data_received = bounded_data_received  # type: ignore[method-assign]
    protocol.on_headers_complete = bounded_on_headers_complete  # type: ignore[method-assign]
    protocol.on_body = bounded_on_body  # type: ignore[method-assign]
    protocol.on_message_complete = bounded_on_message_complete  # type: ignore[method-assign]
    protocol.send_400_response = bounded_send_400_response  # type: ignore[method-assign]
    protocol._orchestrator_bounded = True  # type: ignore[attr-defined]
    return True
