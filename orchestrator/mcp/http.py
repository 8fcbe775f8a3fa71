"""The delegation tools over MCP's streamable HTTP transport, served by the API process at /mcp/.

A worker's agent connects with its delegated token as a bearer header, so no Python process is
started per worker (the stdio server pays the SDK's imports once per worker). The MCP SDK is imported,
and its session manager started, on the first request only: servers that never see an MCP client
pay nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from orchestrator.core.address import ApiAddress
from orchestrator.core.auth import decode_access_token
from orchestrator.core.errors import Unauthorized

Scope = dict[str, Any]


class McpOverHttp:
    """ASGI app to mount at /mcp: authenticates the worker, then hands over to the MCP SDK."""

    def __init__(self, address: Callable[[], ApiAddress]) -> None:
        # Resolved at the first request: by then this process's listening socket exists.
        self._resolve_address = address
        self._address: ApiAddress | None = None
        self._app: Any = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            await _reply(send, 401, "Not authenticated: send a worker's token as 'Authorization: Bearer'")
            return
        try:
            claims = decode_access_token(token.strip())
        except Unauthorized as exc:
            await _reply(send, 401, exc.detail)
            return
        if claims.job_id is None or claims.worker_id is None:
            await _reply(send, 403, "The delegation tools are for workers: use a worker's delegated token")
            return
        app = await self._ensure_app()
        from orchestrator.mcp.server import Api, current_api

        if self._address is None:
            self._address = self._resolve_address()
        worker_api = Api(
            url=self._address.url,
            token=token.strip(),
            job_id=claims.job_id,
            socket_path=self._address.socket_path,
        )
        reset = current_api.set(worker_api)
        try:
            await app(scope, receive, send)
        finally:
            current_api.reset(reset)
            await worker_api.aclose()

    async def _ensure_app(self) -> Any:
        if self._app is not None:
            return self._app
        async with self._lock:
            if self._app is None:
                from mcp.server.transport_security import TransportSecuritySettings

                from orchestrator.mcp.server import server

                app = server.streamable_http_app(
                    streamable_http_path="/",
                    stateless_http=True,
                    json_response=True,
                    # Authentication is the worker token above; callers reach us by any host name.
                    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
                )
                started = asyncio.Event()
                self._runner = asyncio.create_task(self._run(server, started))
                await started.wait()
                self._app = app
        return self._app

    async def _run(self, server: Any, started: asyncio.Event) -> None:
        # The session manager's task group must be entered and left by one task: this one.
        async with server.session_manager.run():
            started.set()
            await self._stop.wait()

    async def close(self) -> None:
        self._stop.set()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner


async def _reply(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
