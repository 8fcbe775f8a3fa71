"""Issue 20 item 7: a task is bounded (64 KiB of UTF-8) and reaches the real agent CLIs on stdin
only: never on a command line (/proc/PID/cmdline is readable by every local user) nor in their
environment. Command profiles still get it on stdin and in ORCHESTRATOR_TASK.

The real `claude` and `codex` CLIs run against fake model APIs; each model request is answered
while the CLI waits for it, so that is when every process's command line is read."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.agents.conftest import Scenarios
from tests.agents.test_codex_workers import (  # noqa: F401 (fixtures)
    codex_bin,
    codex_scenarios,
    codex_server,
    openai_fake,
)
from tests.fakes import fake_anthropic, fake_openai_responses
from tests.integration.test_engine_lifecycle import submit, wait_final, workers_of
from tests.support.servers import Server, ServerFactory

TIMEOUT = 120.0
LIMIT = 64 * 1024


def processes_holding(marker: bytes, what: str) -> list[str]:
    """`pid: command` of every process whose /proc/PID/<what> holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            data = Path(f"/proc/{entry}/{what}").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker in data:
            found.append(f"{entry}: {cmdline[:200]!r}")
    return found


def big_task(tag: str, marker: str) -> str:
    """A task just under the limit, multi-byte text included, with `marker` in it."""
    head = f"{tag} {marker} Schreib die Datei ünd prüfe sie. "
    filler = "ü" * ((LIMIT - 200 - len(head.encode())) // 2)
    return head + filler + " end-" + marker


def scan_while_waiting(seen: dict[str, list[str]], marker: str, answer: Any) -> Any:
    def script(body: dict[str, Any], turn: int, n: int) -> Any:
        seen.setdefault("cmdline", []).extend(processes_holding(marker.encode(), "cmdline"))
        seen.setdefault("environ", []).extend(processes_holding(marker.encode(), "environ"))
        seen.setdefault("asked", []).append(str(n))
        return answer

    return script


def test_claude_code_gets_the_task_on_stdin_only(claude_server: Server, scenarios: Scenarios) -> None:
    marker = f"secret-{uuid.uuid4().hex}"
    seen: dict[str, list[str]] = {}
    tag = scenarios.add("stdin-claude", scan_while_waiting(seen, marker, fake_anthropic.text("Done.")))
    task = big_task(tag, marker)
    with claude_server.client() as client:
        job = submit(client, task_description=task, agent="claude-code")
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
    assert done["status"] == "COMPLETED", (done, worker)
    assert seen.get("asked"), "the model was never asked"
    # The model got the whole task, read from stdin.
    first = scenarios.bodies["stdin-claude"][0]
    assert marker in str(first["messages"]) and f"end-{marker}" in str(first["messages"])
    assert seen["cmdline"] == [], f"the task is on a command line: {seen['cmdline']}"
    assert seen["environ"] == [], f"the task is in an environment: {seen['environ']}"


def test_codex_gets_the_task_on_stdin_only(
    codex_server: Server,  # noqa: F811
    codex_scenarios: Scenarios,  # noqa: F811
) -> None:
    marker = f"secret-{uuid.uuid4().hex}"
    seen: dict[str, list[str]] = {}
    answer = fake_openai_responses.text("Done.")
    tag = codex_scenarios.add("stdin-codex", scan_while_waiting(seen, marker, answer))
    task = big_task(tag, marker)
    with codex_server.client() as client:
        job = submit(client, task_description=task, agent="codex")
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
    assert done["status"] == "COMPLETED", (done, worker)
    assert seen.get("asked"), "the model was never asked"
    first = codex_scenarios.bodies["stdin-codex"][0]
    assert marker in str(first["input"]) and f"end-{marker}" in str(first["input"])
    assert seen["cmdline"] == [], f"the task is on a command line: {seen['cmdline']}"
    assert seen["environ"] == [], f"the task is in an environment: {seen['environ']}"


@pytest.fixture
def command_server(servers: ServerFactory) -> Server:
    profile = servers.root / "agents.toml"
    # The worker copies what it got on stdin and in ORCHESTRATOR_TASK into its HOME (the sandbox
    # lets it write there, not into its run dir),
    # then waits for the test to have looked at every command line.
    profile.write_text(
        "[agents.echo]\n"
        'type = "command"\n'
        'command = ["sh", "-c", "cat > \\"$HOME/stdin.txt\\"; '
        'printf %s \\"$ORCHESTRATOR_TASK\\" > \\"$HOME/env.txt\\"; '
        'while [ ! -e \\"$HOME/go\\" ]; do sleep 0.05; done"]\n'
    )
    return servers.start(ORCHESTRATOR_AGENTS_FILE=str(profile))


def test_command_profiles_get_a_64_kib_task_on_stdin_and_in_the_environment(command_server: Server) -> None:
    marker = f"secret-{uuid.uuid4().hex}"
    task = big_task("[[command]]", marker)
    assert LIMIT - 210 < len(task.encode()) <= LIMIT
    with command_server.client() as client:
        job = submit(client, task_description=task, agent="echo")
        runs = command_server.root / "data" / "runs"

        def written() -> Path | None:
            for env_file in runs.glob("**/env.txt"):
                if env_file.stat().st_size == len(task.encode()):
                    return env_file.parent
            return None

        from tests.support.wait import wait_until

        run_dir = wait_until(written, timeout=TIMEOUT, what="the worker to copy its task")
        assert processes_holding(marker.encode(), "cmdline") == []
        (run_dir / "go").touch()
        done = wait_final(client, job["id"], timeout=TIMEOUT)
    assert done["status"] == "COMPLETED", done
    assert (run_dir / "stdin.txt").read_text() == task
    assert (run_dir / "env.txt").read_text() == task


@pytest.mark.parametrize(
    "task",
    [
        "é" * (LIMIT // 2 + 1),  # 32,769 characters, 65,538 bytes
        "a" * (LIMIT + 1),
        "é" * 100_000,  # was accepted (under 100,000 characters) and could never start
    ],
    ids=["two-byte", "ascii", "old-character-limit"],
)
def test_a_task_over_64_kib_of_utf8_is_refused_naming_the_limit(shared_server: Server, task: str) -> None:
    with shared_server.client() as client:
        response = client.post("/api/jobs/submit", json={"task_description": task})
    assert response.status_code == 422, response.text[:500]
    message = str(response.json()["detail"])
    assert "65536 bytes" in message and "64 KiB" in message, message[:500]


def test_simulated_options_over_128_kib_reach_the_worker(shared_server: Server) -> None:
    """A simulated worker's options go on stdin: in one environment string, more than 128 KiB of
    them (here three 50 KB sub-tasks) could never start (E2BIG)."""
    subtasks = [
        {"task_description": f"child {i} " + "y" * 50_000, "agent_options": {"duration_seconds": 0}}
        for i in range(3)
    ]
    with shared_server.client() as client:
        job = submit(
            client,
            task_description="parent with big options",
            agent_options={"duration_seconds": 0, "subtasks": subtasks},
        )
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        children = client.get("/api/jobs", params={"parent_job_id": job["id"]}).json()["jobs"]
    assert done["status"] == "COMPLETED", done
    assert sorted(c["task_description"][:8] for c in children) == ["child 0 ", "child 1 ", "child 2 "]
    assert all(c["status"] == "COMPLETED" for c in children), children
