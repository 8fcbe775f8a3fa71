"""The address workers reach this server at, however it was started.

The guide starts the server with `uvicorn orchestrator.api.main:app --port N --workers 4` and no
`PORT` variable, so the settings alone cannot know the port: workers handed `HOST:PORT` from the
settings would call a server that is not there. The listening sockets this process holds are the
truth: uvicorn with `--workers N` or `--reload`, and gunicorn, hand them to the serving process
before the app starts; a single uvicorn process binds its socket right after the app's start-up,
so the engine start waits for it (`wait_for_address`). `ORCHESTRATOR_PUBLIC_URL` (a proxy, another
host) always wins. With `--uds PATH` workers get `http://localhost` and `ORCHESTRATOR_API_SOCKET`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.core.config import Settings

log = logging.getLogger(__name__)

UNIX_URL = "http://localhost"
# A process with the app and no listening socket after this long is not an HTTP server we can
# find (an in-process test client): the settings' address is used, with a warning.
SOCKET_WAIT_SECONDS = 120.0
SOCKET_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ApiAddress:
    """Where workers, their MCP tools and the CLI inside a worker reach the API."""

    url: str
    socket_path: str | None = None  # an AF_UNIX socket: connect there, whatever the URL's host


@dataclass(frozen=True)
class Listener:
    family: int
    name: Any  # getsockname(): (host, port[, flow, scope]) or a path


def listening_sockets() -> list[Listener]:
    """The listening stream sockets this process holds, in descriptor order ([] without /proc)."""
    found: list[Listener] = []
    try:
        names = sorted(os.listdir("/proc/self/fd"), key=lambda n: int(n) if n.isdigit() else -1)
    except OSError:
        return found
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            # A duplicate descriptor: closing it leaves the server's socket alone.
            duplicate = os.dup(int(name))
            try:
                sock = socket.socket(fileno=duplicate)
            except OSError:
                os.close(duplicate)
                raise
            with sock:
                if sock.type != socket.SOCK_STREAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                    socket.AF_UNIX,
                ):
                    continue
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue
                found.append(Listener(sock.family, sock.getsockname()))
    return found


def address_of(listener: Listener) -> ApiAddress | None:
    """How a client on this host reaches `listener` (wildcard binds become the loopback)."""
    if listener.family == socket.AF_UNIX:
        path = listener.name
        if isinstance(path, bytes):
            path = path.decode(errors="surrogateescape")
        if not path or path.startswith("\0"):  # unnamed or abstract: nothing a path can name
            return None
        return ApiAddress(url=UNIX_URL, socket_path=os.path.abspath(path))
    host, port = listener.name[0], listener.name[1]
    if listener.family == socket.AF_INET6:
        host = "::1" if host in ("::", "") else host.split("%", 1)[0]
        if host.startswith("::ffff:"):  # an IPv4-mapped address: its IPv4 form
            return ApiAddress(url=f"http://{host[len('::ffff:') :]}:{port}")
        return ApiAddress(url=f"http://[{host}]:{port}")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return ApiAddress(url=f"http://{host}:{port}")


def explicit_address(settings: Settings) -> ApiAddress | None:
    if settings.orchestrator_public_url:
        return ApiAddress(url=settings.orchestrator_public_url.rstrip("/"))
    return None


def settings_address(settings: Settings) -> ApiAddress:
    """What the settings say (HOST/PORT): for an engine without the API (`orchestrator engine`)."""
    return ApiAddress(url=settings.public_url)


def current_address(settings: Settings) -> ApiAddress | None:
    """The explicit URL, else the socket this process serves on; None if it holds none yet.

    Of several listeners, one on the configured PORT is preferred, then TCP before a unix socket.
    """
    explicit = explicit_address(settings)
    if explicit is not None:
        return explicit
    candidates = [(lst, addr) for lst in listening_sockets() if (addr := address_of(lst)) is not None]
    if not candidates:
        return None
    for listener, address in candidates:
        if listener.family != socket.AF_UNIX and listener.name[1] == settings.port:
            return address
    tcp = [address for listener, address in candidates if listener.family != socket.AF_UNIX]
    return (tcp or [candidates[0][1]])[0]


async def wait_for_address(settings: Settings, patience: float = SOCKET_WAIT_SECONDS) -> ApiAddress:
    """`current_address`, waiting for the server to bind; the settings' address after `patience`."""
    deadline = time.monotonic() + patience
    while True:
        address = current_address(settings)
        if address is not None:
            return address
        if time.monotonic() > deadline:
            fallback = settings_address(settings)
            log.warning(
                "this process holds no listening socket after %.0f s: workers get %s "
                "(set ORCHESTRATOR_PUBLIC_URL to choose)",
                patience,
                fallback.url,
            )
            return fallback
        await asyncio.sleep(SOCKET_POLL_SECONDS)
