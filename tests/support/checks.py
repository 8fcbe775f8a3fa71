"""Server-side checks shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import Server, ServerFactory

_checked: dict[Path, int] = {}

SERVER_ERROR_MARKERS = ("Traceback (most recent call last)", "unexpected error")


def _servers_of(request: pytest.FixtureRequest) -> list[Server]:
    found: list[Server] = []
    for value in request.node.funcargs.values():
        if isinstance(value, Server):
            found.append(value)
        elif isinstance(value, ServerFactory):
            found.extend(value.servers)
    return found


def new_server_errors(server: Server) -> str:
    """What the server logged as an unexpected error since the last check (empty if nothing)."""
    text = server.log()
    start = _checked.get(server.log_path, 0)
    _checked[server.log_path] = len(text)
    fresh = text[start:]
    return fresh if any(marker in fresh for marker in SERVER_ERROR_MARKERS) else ""


def no_server_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fixture body: after the test, fail if any server it used answered a 500 / logged a traceback."""
    for server in _servers_of(request):
        new_server_errors(server)  # ignore what happened before this test
    yield
    for server in _servers_of(request):
        errors = new_server_errors(server)
        assert not errors, f"server {server.url} logged an unexpected error:\n{errors[-6000:]}"
