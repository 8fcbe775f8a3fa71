"""Real servers for tests: uvicorn processes on free ports, each with its own data dir and database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from orchestrator.core.auth import ALL_SCOPES, create_access_token

TEST_SECRET_KEY = "test-secret-key-for-the-suite-0123456789abcdef"
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_database_kind() -> str:
    return os.environ.get("TEST_DATABASE", "sqlite")


def create_pg_database() -> str:
    """A fresh PostgreSQL database; returns its URL."""
    import asyncio

    import asyncpg

    name = f"orch_test_{uuid.uuid4().hex[:12]}"

    async def _create() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(_create())
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    import asyncio

    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def _drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(_drop())


def token(scopes: list[str] | None = None, user: str = "test-user") -> str:
    return create_access_token(user_id=user, scopes=ALL_SCOPES if scopes is None else scopes)


@dataclass
class Server:
    root: Path
    port: int
    env: dict[str, str]
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> Server:
        """Start it and wait until /health answers 200: up to `timeout` (generous: with both cores
        busy, four uvicorn workers took over 30 s to import and bind)."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=10.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def kill9(self) -> None:
        """SIGKILL the server process only (its workers live in their own sessions)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def client(self, scopes: list[str] | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token(scopes)}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0, **kwargs)


class ServerFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[Server] = []
        self.pg_urls: list[str] = []
        self._database_url: str | None = None

    def database_url(self) -> str:
        if self._database_url is None:
            if test_database_kind() == "postgres":
                self._database_url = create_pg_database()
                self.pg_urls.append(self._database_url)
            else:
                self._database_url = f"sqlite:///{self.root / 'data' / 'orchestrator.db'}"
        return self._database_url

    def base_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "DATABASE_URL"))}
        env.update(
            {
                "SECRET_KEY": TEST_SECRET_KEY,
                "DATABASE_URL": self.database_url(),
                "ORCHESTRATOR_DATA_DIR": str(self.root / "data"),
                "ORCHESTRATOR_TERMINATE_GRACE_SECONDS": "3",
                # Live streams must be woken by commits and by the change mark; their safety-net
                # poll is pushed out of reach, so a wake-up that is missed fails a test.
                "ORCHESTRATOR_SSE_IDLE_POLL_SECONDS": "600",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def make(self, *, workers: int = 1, port: int | None = None, **extra: str) -> Server:
        port = port or free_port()
        env = self.base_env(**extra)
        env["ORCHESTRATOR_PUBLIC_URL"] = env.get("ORCHESTRATOR_PUBLIC_URL", f"http://127.0.0.1:{port}")
        argv = [sys.executable, "-m", "uvicorn", "orchestrator.api.main:app", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--log-level", "warning"]
        if workers > 1:
            argv += ["--workers", str(workers)]
        server = Server(root=self.root, port=port, env=env, argv=argv)
        self.servers.append(server)
        return server

    def start(self, **kwargs: Any) -> Server:
        return self.make(**kwargs).start()

    @contextmanager
    def standalone_engine(self, api: Server, **extra: str) -> Iterator[subprocess.Popen[bytes]]:
        """`orchestrator engine` on this factory's database, next to an API started with
        ORCHESTRATOR_ENGINE=false; stopped with SIGTERM (and must stop within 30 s)."""
        import pytest

        env = self.base_env(ORCHESTRATOR_PUBLIC_URL=api.url, **extra)
        log_path = self.root / f"engine-{uuid.uuid4().hex[:8]}.log"
        log = log_path.open("wb")
        engine = subprocess.Popen(
            [str(Path(sys.executable).parent / "orchestrator"), "engine"],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 180  # generous: start-up on a loaded host
            while "Engine running" not in log_path.read_text(errors="replace"):
                if engine.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        "`orchestrator engine` did not start:\n" + log_path.read_text(errors="replace")
                    )
                time.sleep(0.05)
            yield engine
        finally:
            engine.terminate()
            try:
                engine.wait(30)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait()
                pytest.fail(
                    "`orchestrator engine` did not stop within 30 s of SIGTERM:\n"
                    + log_path.read_text(errors="replace")[-5000:]
                )
            finally:
                log.close()

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        _kill_leftover_workers(self.root)
        for url in self.pg_urls:
            drop_pg_database(url)


def _kill_leftover_workers(root: Path) -> None:
    """Worker processes outlive servers by design; a test must not leave any behind."""
    runs = root / "data" / "runs"
    if not runs.exists():
        return
    for pid_file in runs.glob("*/pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            os.killpg(pid, signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError, OSError):
            pass


@contextmanager
def server_factory(root: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(root)
    try:
        yield factory
    finally:
        factory.close()
