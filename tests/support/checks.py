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


def session_processes(session_id: int) -> dict[int, tuple[str, str]]:
    """Host PID -> (state, command line) of every process in a worker's session (the wrapper's
    PID): what runs inside a sandboxed worker, seen from the host, whatever PIDs it sees itself."""
    found: dict[int, tuple[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[3]) == session_id:  # field 6 of /proc/PID/stat: the session
            found[int(entry.name)] = (fields[0], cmdline.strip())
    return found
