"""A real Claude Code worker gets the delegation tools however the server was started (issue 20, 1).

Started with the API guide's command (no PORT variable) or on a unix socket, the server hands
the worker an MCP configuration that reaches it: the tools are connected at the CLI's start and
the sub-job the (fake) model spawns through them completes. Before the fix the worker was told
127.0.0.1:8000: its MCP server failed to connect and the spawn never happened.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.agents.conftest import Scenarios
from tests.fakes.fake_anthropic import FakeAnthropic, Step, text, tool_result_texts, tool_use
from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.integration.test_public_url import APP, running
from tests.support.servers import ServerFactory, free_port

TIMEOUT = 120.0


@pytest.mark.parametrize("how", ["guide", "uds"])
def test_claude_code_gets_its_tools_and_its_child_completes(
    servers: ServerFactory, claude_bin: Path, fake: FakeAnthropic, scenarios: Scenarios, how: str
) -> None:
    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if turn == 0:
            return tool_use(
                "mcp__orchestrator__spawn_subjob",
                {
                    "task_description": "child work",
                    "agent": "simulated",
                    "agent_options": {"duration_seconds": 0.2},
                    "wait": True,
                },
            )
        return text("My sub-job finished.")

    tag = scenarios.add(f"address-{how}", script)
    if how == "guide":
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", APP, "--port", str(port), "--workers", "4"]
        url, uds = f"http://127.0.0.1:{port}", None
    else:
        uds = str(servers.root / "api.sock")
        argv = [sys.executable, "-m", "uvicorn", APP, "--uds", uds]
        url = "http://localhost"
    agent_env = {
        "ORCHESTRATOR_CLAUDE_BIN": str(claude_bin),
        "ANTHROPIC_BASE_URL": fake.url,
        "ANTHROPIC_API_KEY": "test-key",
    }
    with running(servers, argv, url, uds=uds, **agent_env) as server, server.client() as client:
        job = submit(client, task_description=f"{tag} delegate", agent="claude-code")
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        events = client.get(f"/api/jobs/{job['id']}/events").json()["events"]
        init = next(e for e in events if e["kind"] == "agent.init")
        assert {"name": "orchestrator", "status": "connected"}.items() <= init["data"]["mcp_servers"][
            0
        ].items(), (init, log_lines(client, worker["id"])[-10:])
        assert "mcp__orchestrator__spawn_subjob" in init["data"]["tools"]
        assert done["status"] == "COMPLETED", (done, log_lines(client, worker["id"])[-10:])
        children = client.get("/api/jobs", params={"parent_job_id": job["id"]}).json()["jobs"]
        assert [child["status"] for child in children] == ["COMPLETED"], children
        config = json.loads((servers.root / "data" / "runs" / worker["id"] / "mcp.json").read_text())
        entry = config["mcpServers"]["orchestrator"]
        if uds:  # the CLI's HTTP client cannot dial a unix socket: the stdio server does
            assert entry["type"] == "stdio" and entry["env"]["ORCHESTRATOR_API_SOCKET"] == uds
        else:
            assert entry["url"] == f"{url}/mcp/"
    results = tool_result_texts(scenarios.bodies[f"address-{how}"][-1])
    assert f"Job {children[0]['id']}: COMPLETED" in results[0], results
