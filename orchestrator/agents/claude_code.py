"""`claude-code`: the real Claude Code CLI, headless, its stream-json output parsed.

    claude -p --output-format stream-json --verbose --permission-mode ... \\
        --mcp-config <run_dir>/mcp.json --strict-mcp-config --allowedTools mcp__orchestrator__* ...

The task arrives on stdin, never in argv or the environment. Each worker gets its own HOME and
CLAUDE_CONFIG_DIR (session transcripts live there, so a parked worker can be resumed with
`--resume <session_id>`), the server's `ANTHROPIC_*` environment, and the orchestrator's MCP
server (`python -m orchestrator.mcp`) holding its delegated token.
Facts behind every flag and variable: docs/agent-cli-harness.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.agents.base import (
    AgentEvent,
    CliAgent,
    LaunchSpec,
    Outcome,
    WorkerContext,
    api_environment,
    base_environment,
    json_object,
    resolve_binary,
)
from orchestrator.core.config import Settings

MCP_SERVER_NAME = "orchestrator"
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
RETRYABLE_TYPES = frozenset({"overloaded_error", "rate_limit_error", "api_error"})
MAX_TEXT = 4000
MAX_INPUT_CHARS = 2000
RESUME_PROMPT = (
    "Continue the task from where you stopped; your previous attempt was interrupted by an API "
    "rate limit or overload."
)
PROVIDER_PREFIXES = ("ANTHROPIC_", "CLAUDE_CODE_USE_", "AWS_", "GOOGLE_", "CLOUD_ML_", "VERTEX_")


class ClaudeCodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=200)
    permission_mode: Literal["bypassPermissions", "acceptEdits", "default", "plan"] = "bypassPermissions"
    allowed_tools: list[str] = Field(default_factory=list, max_length=100)
    disallowed_tools: list[str] = Field(default_factory=list, max_length=100)
    max_turns: int | None = Field(default=None, ge=1, le=10_000)
    append_system_prompt: str | None = Field(default=None, max_length=50_000)
    # Give the worker the orchestrator's delegation tools (spawn_subjob, ...).
    delegation: bool = True
    # How the delegation tools reach the CLI: over HTTP from the API process (no process per
    # worker), or a stdio server process started for this worker.
    mcp_transport: Literal["http", "stdio"] = "http"
    # Claude Code's own nested sub-agents (Task tool): delegation goes through the orchestrator.
    max_subagent_depth: int = Field(default=1, ge=0, le=5)


def _clip(text: Any, limit: int = MAX_TEXT) -> Any:
    if isinstance(text, str) and len(text) > limit:
        return text[:limit] + f"... [{len(text) - limit} more characters]"
    return text


def provider_environment(prefixes: tuple[str, ...]) -> dict[str, str]:
    """The server's provider settings (base URL, key, cloud switches) that workers need."""
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


def mcp_config(ctx: WorkerContext, transport: str = "http") -> dict[str, Any]:
    """The orchestrator's delegation tools for one worker, holding that worker's delegated token.

    `http` (default): served by the API process at /mcp/ — nothing to start per worker.
    `stdio`: `python -m orchestrator.mcp` started by the CLI for this worker (a Python process each); also
    when the API listens on a unix socket (`uvicorn --uds`), which the CLI's HTTP client cannot use.
    """
    if transport == "http" and not ctx.api_socket:
        return {
            "mcpServers": {
                MCP_SERVER_NAME: {
                    "type": "http",
                    "url": f"{ctx.api_url}/mcp/",
                    "headers": {"Authorization": f"Bearer {ctx.token}"},
                }
            }
        }
    env = {
        **api_environment(ctx),
        "ORCHESTRATOR_TOKEN": ctx.token,
        "ORCHESTRATOR_JOB_ID": ctx.job_id,
        "ORCHESTRATOR_WORKER_ID": ctx.worker_id,
        "ORCHESTRATOR_DEPTH": str(ctx.depth),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(ctx.home),
    }
    return {
        "mcpServers": {
            MCP_SERVER_NAME: {
                "type": "stdio",
                "command": sys.executable,
                "args": ["-m", "orchestrator.mcp"],
                "env": env,
            }
        }
    }


def write_private(path: Path, text: str) -> None:
    """Write a config file the agent reads, 0600. Its directory may be the agent's (HOME, kept
    across a resumed run): whatever the agent left at the name (a link to a host file, which a
    plain open as root would write through) is removed first, and the file is made new."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


class ClaudeCodeAgent(CliAgent):
    name = "claude-code"
    options_model = ClaudeCodeOptions
    cli_title = "the Claude Code CLI"
    install_hint = "`npm install -g @anthropic-ai/claude-code` or set ORCHESTRATOR_CLAUDE_BIN to its path"

    def __init__(self, settings: Settings) -> None:
        self.configured_bin = settings.orchestrator_claude_bin
        self.max_retries = settings.orchestrator_agent_max_retries
        self.mcp_timeout_ms = settings.orchestrator_mcp_connect_timeout_ms

    def account_key(self) -> str:
        env = provider_environment(("ANTHROPIC_",))
        ident = "|".join(
            env.get(k, "") for k in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")
        )
        return "anthropic:" + hashlib.sha256(ident.encode()).hexdigest()[:16]

    def launch(self, ctx: WorkerContext) -> LaunchSpec:
        binary = resolve_binary(self.configured_bin)
        if binary is None:
            raise RuntimeError(self.unavailable_reason())
        options = ClaudeCodeOptions.model_validate(ctx.options)
        # The task goes on stdin (`-p` with no prompt argument reads it there): never in argv,
        # which every local user can read in /proc/PID/cmdline, nor in the environment.
        task = RESUME_PROMPT if ctx.resume_session else ctx.task
        argv = [binary, "-p", "--output-format", "stream-json", "--verbose"]
        argv += ["--permission-mode", options.permission_mode]
        if options.model:
            argv += ["--model", options.model]
        max_turns = options.max_turns or ctx.max_turns
        if ctx.max_turns is not None and options.max_turns is not None:
            max_turns = min(ctx.max_turns, options.max_turns)
        if max_turns is not None:
            argv += ["--max-turns", str(max_turns)]
        if options.append_system_prompt:
            argv += ["--append-system-prompt", options.append_system_prompt]
        allowed = list(options.allowed_tools)
        if options.delegation:
            path = ctx.run_dir / "mcp.json"
            write_private(path, json.dumps(mcp_config(ctx, options.mcp_transport)))
            argv += ["--mcp-config", str(path), "--strict-mcp-config"]
            allowed.insert(0, f"mcp__{MCP_SERVER_NAME}__*")
        else:
            argv += ["--strict-mcp-config"]
        if allowed:
            argv += ["--allowedTools", ",".join(allowed)]
        if options.disallowed_tools:
            argv += ["--disallowedTools", ",".join(options.disallowed_tools)]
        if ctx.resume_session:
            argv += ["--resume", ctx.resume_session]

        env = base_environment(ctx, with_task=False)
        env.update(provider_environment(PROVIDER_PREFIXES))
        env.update(
            {
                "CLAUDE_CONFIG_DIR": str(ctx.home / ".claude"),
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "CLAUDE_CODE_MAX_RETRIES": str(self.max_retries),
                "CLAUDE_CODE_MAX_SUBAGENT_SPAWN_DEPTH": str(options.max_subagent_depth),
                "MCP_CONNECTION_NONBLOCKING": "false",
                "MCP_CONNECT_TIMEOUT_MS": str(self.mcp_timeout_ms),
                "ENABLE_TOOL_SEARCH": "false",
            }
        )
        if options.permission_mode == "bypassPermissions" and os.geteuid() == 0:
            env["IS_SANDBOX"] = "1"  # else the CLI refuses bypass mode as root
        return LaunchSpec(argv=argv, env=env, stdin_text=task)

    # ------------------------------------------------------------------ output

    def parse_events(self, line: str) -> list[AgentEvent]:
        data = json_object(line)
        if data is None:
            return []
        kind = data.get("type")
        if kind == "system":
            return self._system(data)
        if kind == "assistant":
            return self._assistant(data)
        if kind == "result":
            return self._result(data)
        return []

    def parse_line(self, line: str) -> AgentEvent | None:
        events = self.parse_events(line)
        return events[0] if events else None

    @staticmethod
    def _system(data: dict[str, Any]) -> list[AgentEvent]:
        subtype = data.get("subtype")
        if subtype == "init":
            servers = data.get("mcp_servers") or []
            return [
                AgentEvent(
                    "init",
                    {
                        "session_id": data.get("session_id"),
                        "model": data.get("model"),
                        "tools": data.get("tools") or [],
                        "mcp_servers": servers,
                        "permission_mode": data.get("permissionMode"),
                        "version": data.get("claude_code_version"),
                    },
                )
            ]
        if subtype == "api_retry":
            keys = ("attempt", "max_retries", "retry_delay_ms", "error_status", "error")
            return [AgentEvent("api_retry", {k: data.get(k) for k in keys})]
        return []

    @staticmethod
    def _assistant(data: dict[str, Any]) -> list[AgentEvent]:
        message = data.get("message") or {}
        events: list[AgentEvent] = []
        if data.get("is_api_error_message") or message.get("model") == "<synthetic>":
            texts = [b.get("text", "") for b in message.get("content") or [] if isinstance(b, dict)]
            return [
                AgentEvent(
                    "api_error",
                    {"status": data.get("api_error_status"), "text": _clip(" ".join(texts))},
                )
            ]
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and block.get("text"):
                events.append(AgentEvent("message", {"text": _clip(block["text"])}))
            elif block.get("type") == "tool_use":
                raw = json.dumps(block.get("input"), ensure_ascii=False)
                shown: Any = block.get("input")
                if len(raw) > MAX_INPUT_CHARS:
                    shown = _clip(raw, MAX_INPUT_CHARS)
                events.append(
                    AgentEvent("tool_use", {"id": block.get("id"), "name": block.get("name"), "input": shown})
                )
        return events

    @staticmethod
    def _result(data: dict[str, Any]) -> list[AgentEvent]:
        keys = (
            "subtype",
            "is_error",
            "num_turns",
            "total_cost_usd",
            "usage",
            "session_id",
            "terminal_reason",
            "api_error_status",
            "api_error_type",
            "errors",
            "duration_ms",
            "duration_api_ms",
        )
        result = {k: data.get(k) for k in keys if data.get(k) is not None}
        result["is_error"] = bool(data.get("is_error"))
        result["result"] = _clip(data.get("result"))
        denials = data.get("permission_denials") or []
        result["permission_denials"] = denials
        events = [AgentEvent("result", result)]
        if denials:
            names = sorted({str(d.get("tool_name")) for d in denials if isinstance(d, dict)})
            events.append(
                AgentEvent("permission_denied", {"count": len(denials), "tools": names, "denials": denials})
            )
        return events

    def outcome(self, result: dict[str, Any] | None, exit_code: int | None) -> Outcome | None:
        if not result:
            return None
        session = result.get("session_id")
        if result.get("waiting"):
            # Parked, and the engine restarted before resuming it: park it again.
            return Outcome(False, "waiting: rate limited", retryable=True, resume_session=session)
        if "is_error" not in result:
            return None  # no result line: the exit code decides
        if not result["is_error"]:
            denials = result.get("permission_denials") or []
            reason = "completed" if not denials else f"completed with {len(denials)} permission denial(s)"
            return Outcome(True, reason)
        status = result.get("api_error_status")
        error_type = result.get("api_error_type")
        text = str(result.get("result") or "").strip()
        errors = result.get("errors") or []
        detail = text or "; ".join(str(e) for e in errors)
        if isinstance(status, int) and (status in RETRYABLE_STATUSES or error_type in RETRYABLE_TYPES):
            hint = result.get("api_retry") or {}
            delay_ms = hint.get("retry_delay_ms") if isinstance(hint, dict) else None
            return Outcome(
                False,
                f"api error {status}" + (f" ({error_type})" if error_type else ""),
                retryable=bool(session),
                retry_after=delay_ms / 1000 if isinstance(delay_ms, int | float) else None,
                resume_session=session,
            )
        if status in (401, 403) or error_type in ("authentication_error", "permission_error"):
            return Outcome(False, f"authentication failed: {detail or f'api error {status}'}")
        if isinstance(status, int):
            return Outcome(False, f"api error {status}: {detail}".rstrip(": "))
        subtype = result.get("subtype") or "error"
        return Outcome(False, f"{subtype}: {detail}" if detail else str(subtype))
