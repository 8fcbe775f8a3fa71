"""Shared fixtures: real uvicorn servers on real databases (SQLite, or PostgreSQL with TEST_DATABASE=postgres)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import TEST_SECRET_KEY, Server, ServerFactory, server_factory, test_database_kind

# Tokens made in the test process must verify in the servers.
os.environ["SECRET_KEY"] = TEST_SECRET_KEY
for _name in [k for k in os.environ if k.startswith("ORCHESTRATOR_") or k == "DATABASE_URL"]:
    del os.environ[_name]


def pytest_report_header() -> str:
    return f"database under test: {test_database_kind()}"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    with server_factory(tmp_path) as factory:
        yield factory


@pytest.fixture
def server(servers: ServerFactory) -> Server:
    return servers.start()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a module whose tests only look at what they create themselves."""
    with server_factory(tmp_path_factory.mktemp("shared")) as factory:
        yield factory.start()


@pytest.fixture(autouse=True)
def _test_runs_umask_kept() -> Iterator[None]:
    """A test that runs the app's start-up in this process (bootstrap.py makes its umask 077)
    must not leave it so: later tests write files that sandboxed agents, under other uids, read."""
    umask = os.umask(0o077)
    os.umask(umask)
    yield
    os.umask(umask)
