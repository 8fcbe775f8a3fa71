"""Issue 20 item 6: request size limits, applied before authentication and parsing.

Headers over ORCHESTRATOR_MAX_HEADER_BYTES (64 KiB) get 431 and bodies over
ORCHESTRATOR_MAX_BODY_BYTES (2 MiB) get 413, announced or chunked, on the API guide's own bare
command (`uvicorn orchestrator.api.main:app --port N --workers 4`, which uses httptools: it used to
buffer every header byte it was sent). Raw sockets, so the test controls every byte on the wire;
memory is read from /proc (VmHWM: the peak resident set of each server process)."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import Server, ServerFactory, free_port, server_factory, token

MIB = 1024 * 1024


def guide_server(servers: ServerFactory, **extra: str) -> Server:
    """`uvicorn orchestrator.api.main:app --port N --workers 4`, exactly as the guide starts it."""
    port = free_port()
    env = servers.base_env(ORCHESTRATOR_PUBLIC_URL=f"http://127.0.0.1:{port}", **extra)
    uvicorn = str(Path(sys.executable).parent / "uvicorn")
    argv = [uvicorn, "orchestrator.api.main:app", "--port", str(port), "--workers", "4"]
    server = Server(root=servers.root, port=port, env=env, argv=argv)
    servers.servers.append(server)
    return server.start(timeout=120)


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("limits")) as factory:
        yield guide_server(factory)


def exchange(server: Server, data: bytes, timeout: float = 60.0) -> bytes:
    """Send `data` on a fresh connection and return everything the server answers."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def test_headers_over_64_kib_get_431(guide: Server) -> None:
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    answer = exchange(guide, b"GET /health HTTP/1.1\r\nHost: x\r\n" + padding + b"\r\n")
    assert status_of(answer) == 431, answer[:300]
    assert b"65536 bytes" in answer and b"ORCHESTRATOR_MAX_HEADER_BYTES" in answer
    # One giant header, and a giant request line: the same.
    answer = exchange(guide, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 80_000 + b"\r\n\r\n")
    assert status_of(answer) == 431, answer[:300]
    answer = exchange(guide, b"GET /health?q=" + b"c" * 80_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) == 431, answer[:300]
    # Under the limit: answered as usual.
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(60))
    answer = exchange(guide, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + padding + b"\r\n")
    assert status_of(answer) == 200, answer[:300]


def server_processes(server: Server) -> list[int]:
    assert server.process is not None
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [int(c) for c in children]


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_100_mb_of_headers_do_not_grow_the_server(guide: Server) -> None:
    pids = server_processes(guide)
    before = {pid: peak_kib(pid) for pid in pids}
    line = b"X-Pad: " + b"p" * (MIB - 9) + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", guide.port), timeout=120) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            while sent < 100 * MIB:
                sock.sendall(line)
                sent += len(line)
            sock.sendall(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server gave up on the request: what should happen
        answer = read_all(sock)
    growth = {pid: peak_kib(pid) - before[pid] for pid in pids}
    assert max(growth.values()) < 20 * 1024, f"peak RSS grew (KiB): {growth}; sent {sent} bytes"
    assert sent < 100 * MIB, f"the server read all {sent} bytes of headers; answered {answer[:200]!r}"
    assert httpx.get(f"{guide.url}/health", timeout=30).status_code == 200


def test_a_body_over_2_mib_gets_413_before_authentication(guide: Server) -> None:
    # Announced: answered before the body is sent at all, with no token.
    head = (
        b"POST /api/jobs/submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (2 * MIB + 1)
    )
    answer = exchange(guide, head)
    assert status_of(answer) == 413, answer[:300]
    assert b"2097152 bytes" in answer and b"ORCHESTRATOR_MAX_BODY_BYTES" in answer
    # Chunked, no length announced: stopped once past the limit, also before the token is read.
    head = (
        b"POST /api/jobs/submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer not-a-token\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (256 * 1024, b" " * (256 * 1024))
    with socket.create_connection(("127.0.0.1", guide.port), timeout=60) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
            for _ in range(40):  # 10 MiB, unless the server stops reading first
                sock.sendall(chunk)
            sock.sendall(b"0\r\n\r\n")
        answer = read_all(sock)
    assert status_of(answer) == 413, answer[:300]
    assert b"ORCHESTRATOR_MAX_BODY_BYTES" in answer


def test_bodies_within_the_limit_are_served(guide: Server) -> None:
    body = b'{"task_description": "x", "agent_options": {"pad": "' + b"z" * (MIB) + b'"}, "bogus": 1}'
    headers = {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}
    response = httpx.post(f"{guide.url}/api/jobs/submit", content=body, headers=headers, timeout=60)
    assert response.status_code == 422, response.text[:300]  # read and validated: not 413

    def chunks() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        yield body[len(body) // 2 :]

    response = httpx.post(f"{guide.url}/api/jobs/submit", content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 422, response.text[:300]


def test_the_limits_are_configurable(servers: ServerFactory) -> None:
    api = servers.start(ORCHESTRATOR_MAX_HEADER_BYTES="4096", ORCHESTRATOR_MAX_BODY_BYTES="4096")
    headers = {"Authorization": f"Bearer {token()}", "X-Pad": "h" * 5000}
    assert httpx.get(f"{api.url}/health", headers=headers, timeout=30).status_code == 431
    body = {"task_description": "t" * 5000}
    response = httpx.post(
        f"{api.url}/api/jobs/submit", json=body, headers={"Authorization": f"Bearer {token()}"}
    )
    assert response.status_code == 413, response.text
    assert response.json() == {
        "detail": "Request body exceeds the limit of 4096 bytes (ORCHESTRATOR_MAX_BODY_BYTES)"
    }
