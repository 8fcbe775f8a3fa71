"""HTTP over a unix socket for the standard library's clients (the simulated worker, the CLI).

When the server listens with `uvicorn --uds PATH`, workers get `ORCHESTRATOR_URL=http://localhost`
and `ORCHESTRATOR_API_SOCKET=PATH`; these classes connect to PATH whatever the URL's host.
Standard library only: the simulated worker imports it and must start in milliseconds.
"""

from __future__ import annotations

import http.client
import os
import socket
import urllib.request
from functools import partial
from typing import Any

SOCKET_ENV = "ORCHESTRATOR_API_SOCKET"


def api_socket() -> str | None:
    """The API's unix socket named by the environment, if any."""
    return os.environ.get(SOCKET_ENV) or None


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, *, socket_path: str, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class UnixSocketHandler(urllib.request.HTTPHandler):
    """urllib's http:// handler, connecting to a unix socket."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.socket_path = socket_path

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(partial(UnixHTTPConnection, socket_path=self.socket_path), req)


def opener(socket_path: str) -> urllib.request.OpenerDirector:
    """An opener whose http:// requests all go to `socket_path` (no proxy: it is local)."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), UnixSocketHandler(socket_path))
