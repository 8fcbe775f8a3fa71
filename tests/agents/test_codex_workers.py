"""The real `codex` CLI as orchestrator workers, against a fake OpenAI Responses API on 127.0.0.1.

One orchestrator server and one fake serve the module; each test tags its task `[[t:<name>]]` and
the fake answers that test's requests from its own script. `codex_bin` installs the CLI with
tests/fakes/install_claude.sh --codex (npm registry) and FAILS, never skips, when that is impossible.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agents.conftest import Scenarios, make_repo
from tests.fakes.fake_openai_responses import (
    FakeOpenAIResponses,
    Step,
    error,
    exec_command,
    function_call,
    function_outputs,
    text,
    turn_of,
)
from tests.fakes.install import installed_cli
from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.servers import Server, server_factory

TIMEOUT = 90.0


@pytest.fixture(scope="session")
def codex_bin() -> Path:
    return installed_cli("codex")


@pytest.fixture(scope="module")
def codex_scenarios() -> Scenarios:
    # The Responses API carries the conversation in `input`.
    return Scenarios(field="input", turn_of=turn_of, fallback=text)


@pytest.fixture(scope="module")
def openai_fake(codex_scenarios: Scenarios) -> Iterator[FakeOpenAIResponses]:
    with FakeOpenAIResponses(codex_scenarios) as server:
        yield server


@pytest.fixture(scope="module")
def codex_server(
    codex_bin: Path, openai_fake: FakeOpenAIResponses, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("codex")) as factory:
        yield factory.start(
            ORCHESTRATOR_CODEX_BIN=str(codex_bin),
            OPENAI_BASE_URL=openai_fake.url,
            OPENAI_API_KEY="test-key",
        )


def events_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = client.get(f"/api/jobs/{job_id}/events").json()["events"]
    return events


def test_exec_command_lands_on_the_worker_branch_with_tokens(
    codex_server: Server, codex_scenarios: Scenarios, openai_fake: FakeOpenAIResponses
) -> None:
    # With bubblewrap installed Codex's own sandbox could not run the command (it said so only to the
    # model, which answered "Done"): the profile must work on such hosts (scripts/test.sh installs it).
    assert shutil.which("bwrap"), (
        "bubblewrap (bwrap) must be installed for this test: apt-get install bubblewrap"
    )

    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if turn == 0:
            return exec_command(
                "printf 'hello from codex\\n' > hello.txt", input_tokens=1200, output_tokens=30
            )
        return text("Done: wrote hello.txt.", input_tokens=1500, output_tokens=12)

    tag = codex_scenarios.add("write", script)
    repo = make_repo(codex_server.root, "codex-write-repo")
    with codex_server.client() as client:
        job = submit(client, task_description=f"{tag} write hello.txt", agent="codex", repository=str(repo))
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker, lines[-8:])
        assert worker["status_reason"] == "completed", worker
        shown = subprocess.run(
            ["git", "-C", str(repo), "show", f"{worker['branch']}:hello.txt"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout == "hello from codex\n"
        assert "1 file changed" in (worker["diff_stat"] or "")
        # The worker's result holds the outcome and the tokens codex reported for the whole turn
        # (both model requests), and the job's usage rolls them up.
        detail = client.get(f"/api/supervisor/workers/{worker['id']}").json()
        result = detail["result"]
        assert result["is_error"] is False, result
        assert result["usage"]["input_tokens"] == 2700 and result["usage"]["output_tokens"] == 42, result
        # Codex's last event carries only usage: the final message and session come from earlier ones.
        assert result["result"] == "Done: wrote hello.txt.", result
        assert result["session_id"], result
        usage = client.get(f"/api/jobs/{job['id']}/usage").json()
        assert usage["input_tokens"] == 2700 and usage["output_tokens"] == 42, usage
        [spent] = usage["workers"]
        assert spent["worker_id"] == worker["id"] and spent["input_tokens"] == 2700, spent
        events = events_of(client, job["id"])
        kinds = {e["kind"] for e in events}
        assert {"agent.init", "agent.message", "agent.tool_use", "agent.result"} <= kinds, kinds
        tool = next(e for e in events if e["kind"] == "agent.tool_use")
        assert "hello.txt" in tool["data"]["input"]["command"] and tool["data"]["exit_code"] == 0
        [init] = [e for e in events if e["kind"] == "agent.init"]
        assert init["data"]["session_id"], init
        messages = [e["data"]["text"] for e in events if e["kind"] == "agent.message"]
        assert messages[-1] == "Done: wrote hello.txt.", messages
    # The CLI talked to the fake with the server's key, from the worker's worktree, ran the tool, and
    # was given the orchestrator's delegation tools (MCP server configured in its CODEX_HOME).
    first, last = codex_scenarios.bodies["write"][0], codex_scenarios.bodies["write"][-1]
    cwd = re.search(r"<cwd>([^<]+)</cwd>", json.dumps(first["input"]))
    assert cwd and worker["id"] in cwd.group(1), cwd
    assert "Process exited with code 0" in function_outputs(last)[0]
    # The delegation server is `required`: Codex waits for it before its first model request, so the
    # tools are offered in every request, also on a loaded host (it used to give the server ~250 ms).
    offered = ["mcp__orchestrator" in json.dumps(body) for body in codex_scenarios.bodies["write"]]
    assert offered and all(offered), offered
    # Those settings are in a private file, not on the command line: the tools are served by the API
    # process at /mcp/ and the CLI authenticates with the worker's delegated token from its environment.
    [config] = codex_server.root.rglob(f"runs/{worker['id']}/home/.codex/config.toml")
    assert config.stat().st_mode & 0o777 == 0o600
    text_ = config.read_text()
    assert 'model_provider = "orchestrator"' in text_ and f'url="{codex_server.url}/mcp/"' in text_, text_
    assert 'bearer_token_env_var="ORCHESTRATOR_TOKEN"' in text_ and "eyJ" not in text_, text_
    assert "required=true" in text_, text_
    request = next(r for r in openai_fake.response_requests if r.body is first)
    assert request.headers["authorization"] == "Bearer test-key"
    assert not openai_fake.problems


def test_a_tool_call_codex_refused_fails_the_worker(codex_server: Server, codex_scenarios: Scenarios) -> None:
    """Codex refuses an escalated command under approval policy "never" and tells only the model (and
    its log); the model answers "Done" and Codex exits 0. That run must not look like a success."""

    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if turn == 0:
            arguments = {
                "cmd": "touch refused.txt",
                "sandbox_permissions": "require_escalated",
                "justification": "x",
            }
            return function_call("exec_command", arguments)
        return text("Done: all good.")

    tag = codex_scenarios.add("refused", script)
    repo = make_repo(codex_server.root, "codex-refused-repo")
    options = {"sandbox": "workspace-write", "config": {"approval_policy": "never"}}
    with codex_server.client() as client:
        job = submit(
            client,
            task_description=f"{tag} touch",
            agent="codex",
            repository=str(repo),
            agent_options=options,
        )
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "FAILED", (done, worker, log_lines(client, worker["id"])[-8:])
        reason = worker["status_reason"]
        assert reason.startswith("codex did not run 1 tool call(s)"), reason
        assert "approval policy is Never" in reason, reason
        refused = [e for e in events_of(client, job["id"]) if e["kind"] == "agent.tool_refused"]
        assert len(refused) == 1, refused
    assert not (repo / "refused.txt").exists()


def test_a_command_that_ran_and_failed_is_an_event_not_a_failure(
    codex_server: Server, codex_scenarios: Scenarios
) -> None:
    """A command that ran and exited non-zero (a failing test run, say) is the agent's to handle:
    an `agent.command_failed` event with its exit code, and the run's own outcome decides."""

    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if turn == 0:
            return exec_command("echo broken >&2; exit 3")
        return text("Handled the failure.")

    tag = codex_scenarios.add("exit3", script)
    with codex_server.client() as client:
        job = submit(client, task_description=f"{tag} run", agent="codex")
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "COMPLETED", (done, worker)
        [failed] = [e for e in events_of(client, job["id"]) if e["kind"] == "agent.command_failed"]
        assert failed["data"]["exit_code"] == 3 and "broken" in failed["data"]["output"], failed
    function_output = function_outputs(codex_scenarios.bodies["exit3"][-1])
    assert "Process exited with code 3" in function_output[0], function_output


def test_a_codex_that_cannot_start_fails_with_its_own_reason(codex_server: Server) -> None:
    """A configuration Codex refuses (here a retired approval policy) ends it before any turn with
    exit 1 and an `Error: ...` line: the worker's reason is that line, not a bare exit code."""
    options = {"config": {"approval_policy": "untrusted"}}
    with codex_server.client() as client:
        job = submit(client, task_description="never runs", agent="codex", agent_options=options)
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "FAILED", (done, worker)
        reason = worker["status_reason"]
        assert reason.startswith("codex could not start: "), reason
        assert "approval_policy" in reason and "exit code" not in reason, reason


def test_rejected_credentials_fail_with_that_reason(codex_server: Server, codex_scenarios: Scenarios) -> None:
    tag = codex_scenarios.add("auth", lambda body, turn, n: error(401))
    with codex_server.client() as client:
        job = submit(client, task_description=f"{tag} no entry", agent="codex")
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "FAILED", (done, worker)
        assert worker["status"] == "FAILED"
        reason = worker["status_reason"]
        assert reason.startswith("authentication failed: "), worker
        assert "401" in reason and "Incorrect API key" in reason and "exit code" not in reason, reason
        assert done["status_reason"].endswith(reason), done


def test_rate_limit_fails_with_the_status_not_an_exit_code(
    codex_server: Server, codex_scenarios: Scenarios
) -> None:
    tag = codex_scenarios.add("limited", lambda body, turn, n: error(429))
    with codex_server.client() as client:
        job = submit(client, task_description=f"{tag} too many", agent="codex")
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "FAILED", (done, worker)
        assert worker["status_reason"].startswith("api error 429: "), worker
        assert "Too Many Requests" in worker["status_reason"]
        errors = [e for e in events_of(client, job["id"]) if e["kind"] == "agent.api_error"]
        assert errors and errors[-1]["data"]["status"] == 429, errors


def test_delegation_tools_transport_is_http_by_default_and_stdio_on_request(
    tmp_path: Path, codex_bin: Path
) -> None:
    """The config the CLI reads: the API's /mcp/ endpoint by default (nothing to start per worker);
    with `mcp_transport: "stdio"` a per-worker `python -m orchestrator.mcp`, whose environment
    carries the worker's delegated token. The stdio server itself is driven for real in
    tests/agents/test_claude_code_workers.py (same module, other CLI)."""
    import sys

    from orchestrator.agents.base import WorkerContext
    from orchestrator.agents.codex import CodexAgent
    from orchestrator.core.config import Settings

    agent = CodexAgent(Settings(orchestrator_data_dir=tmp_path, orchestrator_codex_bin=str(codex_bin)))

    def config_for(options: dict[str, Any]) -> str:
        home = tmp_path / f"home-{len(options)}-{sorted(options)}"
        ctx = WorkerContext(
            job_id="j_000000000001",
            worker_id="w_000000000001",
            worker_index=0,
            worker_count=1,
            depth=0,
            task="t",
            options=options,
            workdir=tmp_path,
            home=home,
            run_dir=tmp_path,
            api_url="http://127.0.0.1:9",
            token="tok.en.value",
        )
        agent.launch(ctx)
        return (home / ".codex" / "config.toml").read_text()

    http = config_for({})
    assert 'mcp_servers.orchestrator = {url="http://127.0.0.1:9/mcp/"' in http and "tok.en.value" not in http
    stdio = config_for({"mcp_transport": "stdio"})
    assert f"command={json.dumps(sys.executable)}" in stdio and '"tok.en.value"' in stdio, stdio
    assert "mcp_servers.orchestrator" not in config_for(
        {"delegation": False, "mcp_transport": "stdio", "model": "m"}
    )
