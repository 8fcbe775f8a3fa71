"""Workers reach the server however it was started (issue 20, item 1).

Each test starts a real server one way (the API guide's `uvicorn ... --port N --workers 4` with no
PORT variable, `--host 0.0.0.0`, `--uds`, `orchestrator serve`, gunicorn with uvicorn workers, an
explicit ORCHESTRATOR_PUBLIC_URL through a proxy) and runs a simulated job that delegates a sub-job
through the API with its worker token: the tree completes only if the worker was handed an address
that reaches this server. Before the fix workers were always handed HOST:PORT from the settings
(127.0.0.1:8000), and every delegation but `orchestrator serve`'s and the explicit URL's failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.listeners import stop_accepting
from tests.support.servers import ServerFactory, free_port, token
from tests.support.wait import wait_until

BIN = Path(sys.executable).parent
APP = "orchestrator.api.main:app"
TIMEOUT = 90.0


@dataclass
class Running:
    """A server process started from a command line, and how a client reaches it."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    uds: str | None = None

    def client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.uds) if self.uds else None
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token()}"},
            timeout=30.0,
            transport=transport,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def guide_env(servers: ServerFactory, **extra: str) -> dict[str, str]:
    """The suite's environment with nothing that names the address: no PORT, HOST, WORKERS, nor
    ORCHESTRATOR_PUBLIC_URL (base_env drops every ORCHESTRATOR_ variable)."""
    env = servers.base_env(**extra)
    for name in ("PORT", "HOST", "WORKERS"):
        env.pop(name, None)
    return env


@contextmanager
def running(
    servers: ServerFactory, argv: list[str], url: str, *, uds: str | None = None, **extra: str
) -> Iterator[Running]:
    log_path = servers.root / f"server-{len(list(servers.root.glob('server-*.log')))}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            cwd=servers.root,
            env=guide_env(servers, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Running(process, url, log_path, uds)
    try:
        with server.client() as client:

            def healthy() -> bool:
                assert process.poll() is None, f"server exited:\n{server.log()}"
                if uds is not None and not os.path.exists(uds):
                    return False  # (httpx leaks the socket of a refused unix connection)
                try:
                    return client.get("/health", timeout=2.0).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, timeout=60, interval=0.1, what=f"{argv} to answer /health")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def delegation_completes(server: Running) -> None:
    """A simulated worker delegates one sub-job through the API and waits for it."""
    options: dict[str, Any] = {
        "duration_seconds": 0.1,
        "subtasks": [{"task_description": "the child", "agent_options": {"duration_seconds": 0.1}}],
    }
    with server.client() as client:
        root = submit(client, task_description="delegate one sub-job", agent_options=options)
        done = wait_final(client, root["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, root["id"])
        assert done["status"] == "COMPLETED", (
            done,
            client.get(f"/api/supervisor/workers/{worker['id']}").json()["status_reason"],
            log_lines(client, worker["id"])[-8:],
            server.log()[-3000:],
        )
        children = client.get("/api/jobs", params={"parent_job_id": root["id"]}).json()["jobs"]
        assert [child["status"] for child in children] == ["COMPLETED"], children
        assert children[0]["depth"] == 1


def test_the_guides_command_with_workers_and_no_port_variable(servers: ServerFactory) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", APP, "--port", str(port), "--workers", "4"]
    with running(servers, argv, f"http://127.0.0.1:{port}") as server:
        delegation_completes(server)


def test_a_single_process_bound_to_every_interface(servers: ServerFactory) -> None:
    """One uvicorn process binds its socket after the app's start-up: the engine waits for it."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", APP, "--host", "0.0.0.0", "--port", str(port)]
    with running(servers, argv, f"http://127.0.0.1:{port}") as server:
        delegation_completes(server)


def test_a_unix_socket(servers: ServerFactory) -> None:
    path = str(servers.root / "api.sock")
    argv = [sys.executable, "-m", "uvicorn", APP, "--uds", path]
    with running(servers, argv, "http://localhost", uds=path) as server:
        delegation_completes(server)


def test_orchestrator_serve(servers: ServerFactory) -> None:
    port = free_port()
    argv = [str(BIN / "orchestrator"), "serve", "--port", str(port), "--log-level", "warning"]
    with running(servers, argv, f"http://127.0.0.1:{port}") as server:
        delegation_completes(server)


def test_gunicorn_with_uvicorn_workers(servers: ServerFactory) -> None:
    port = free_port()
    argv = [str(BIN / "gunicorn"), "-k", "uvicorn_worker.UvicornWorker", "-w", "2"]
    argv += ["-b", f"127.0.0.1:{port}", APP]
    with running(servers, argv, f"http://127.0.0.1:{port}") as server:
        delegation_completes(server)


class CountingProxy:
    """A TCP forwarder that counts the connections it carried (stands in for a reverse proxy)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            source.close()  # each socket is the source of exactly one pipe

    def close(self) -> None:
        self.closed = True
        stop_accepting(self.listener, self.thread)


def test_an_explicit_public_url_wins(servers: ServerFactory) -> None:
    """Behind a proxy the operator names the URL; workers use it, not the socket they could find."""
    port = free_port()
    proxy = CountingProxy(port)
    try:
        argv = [sys.executable, "-m", "uvicorn", APP, "--port", str(port)]
        public = f"http://127.0.0.1:{proxy.port}"
        with running(servers, argv, f"http://127.0.0.1:{port}", ORCHESTRATOR_PUBLIC_URL=public) as server:
            before = proxy.connections
            delegation_completes(server)
            # The worker's submit and waits went through the proxy (the test's own calls did not).
            assert proxy.connections > before
    finally:
        proxy.close()
