"""Fixtures for tests that run the REAL `claude` CLI as orchestrator workers against a fake API.

`claude_bin` installs the CLI with tests/fakes/install_claude.sh (npm registry) and FAILS, never
skips, when that is impossible. `Scenarios` routes each request of the fake Anthropic server to the
script of the test that made it, by a `[[t:<name>]]` tag in the job's task, so one fake and one
orchestrator server serve a whole module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_anthropic import FakeAnthropic, text, turn_of
from tests.fakes.install import installed_cli
from tests.support.servers import Server, server_factory

TAG = re.compile(r"\[\[t:([a-z0-9_-]+)\]\]")
CWD = re.compile(r"Primary working directory: ([^\s\\\"]+)")


@pytest.fixture(scope="session")
def claude_bin() -> Path:
    return installed_cli("claude")


def workdir_of(body: dict[str, Any]) -> str:
    found = CWD.search(json.dumps(body))
    assert found, "no 'Primary working directory' in the request"
    return found.group(1)


class Scenarios:
    """Routes each request of a fake model API to the script of the test whose tag it carries.

    `field` is where the conversation is in a request body (`messages` for Anthropic, `input` for
    OpenAI Responses); `turn_of` and `fallback` come from the fake that answers.
    """

    def __init__(
        self,
        field: str = "messages",
        turn_of: Callable[[dict[str, Any]], int] = turn_of,
        fallback: Callable[[str], Any] = text,
    ) -> None:
        self.field = field
        self.turn_of = turn_of
        self.fallback = fallback
        self.handlers: dict[str, Callable[[dict[str, Any], int, int], Any]] = {}
        self.counts: dict[str, int] = {}
        self.bodies: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()

    def add(self, name: str, handler: Callable[[dict[str, Any], int, int], Any]) -> str:
        self.handlers[name] = handler
        return f"[[t:{name}]]"

    def __call__(self, body: dict[str, Any]) -> Any:
        found = TAG.search(json.dumps(body.get(self.field) or []))
        if not found or found.group(1) not in self.handlers:
            return self.fallback("no scenario for this request")
        name = found.group(1)
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            n = self.counts[name]
            self.bodies.setdefault(name, []).append(body)
        return self.handlers[name](body, self.turn_of(body), n)


@pytest.fixture(scope="module")
def scenarios() -> Scenarios:
    return Scenarios()


@pytest.fixture(scope="module")
def fake(scenarios: Scenarios) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(scenarios) as server:
        yield server


@pytest.fixture(scope="module")
def claude_server(
    claude_bin: Path, fake: FakeAnthropic, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("claude")) as factory:
        yield factory.start(
            ORCHESTRATOR_CLAUDE_BIN=str(claude_bin),
            ANTHROPIC_BASE_URL=fake.url,
            ANTHROPIC_API_KEY="test-key",
            ORCHESTRATOR_RATE_LIMIT_BACKOFF_SECONDS="1",
        )


def make_repo(root: Path, name: str) -> Path:
    repo = root / name
    repo.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=env)
    (repo / "README.md").write_text("test repo\n")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", "init"], check=True, env=env)
    return repo
