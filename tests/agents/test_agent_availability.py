"""Profiles whose CLI is missing are refused at submit with what to install (no CLI needed here)."""

from __future__ import annotations

from tests.support.servers import ServerFactory


def test_claude_code_and_codex_missing_cli_is_a_400(servers: ServerFactory) -> None:
    server = servers.start(
        ORCHESTRATOR_ENGINE="false",
        ORCHESTRATOR_CLAUDE_BIN="/nonexistent/bin/claude",
        ORCHESTRATOR_CODEX_BIN="codex-not-installed-here",
    )
    with server.client() as client:
        claude = client.post("/api/jobs/submit", json={"task_description": "t", "agent": "claude-code"})
        assert claude.status_code == 400, claude.text
        detail = claude.json()["detail"]
        assert "Agent 'claude-code' cannot run on this server" in detail
        assert "npm install -g @anthropic-ai/claude-code" in detail and "ORCHESTRATOR_CLAUDE_BIN" in detail
        codex = client.post("/api/jobs/submit", json={"task_description": "t", "agent": "codex"})
        assert codex.status_code == 400 and "npm install -g @openai/codex" in codex.json()["detail"]
        # The simulated profile still works.
        assert client.post("/api/jobs/submit", json={"task_description": "t"}).status_code == 201
