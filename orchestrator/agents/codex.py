"""`codex`: the OpenAI Codex CLI, headless (`codex exec --json`), its JSONL events parsed.

Codex ignores OPENAI_BASE_URL: when the server sets it, the provider is configured as
`model_providers.orchestrator={...}` with `model_provider="orchestrator"` (Responses API). Each worker
gets its own CODEX_HOME, whose `config.toml` (mode 0600) holds the provider and the orchestrator's MCP
server: that server's settings carry the worker's delegated token, which must not be in argv.
A rejected request ends the turn with `turn.failed` ("unexpected status 401 Unauthorized: ...", after
codex's own reconnect attempts); its HTTP status decides the reason. Facts: docs/agent-cli-harness.md.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.agents.base import (
    Agent,
    AgentEvent,
    LaunchSpec,
    Outcome,
    SandboxProfile,
    WorkerContext,
    base_environment,
    install_dirs,
    json_object,
)
from orchestrator.agents.claude_code import _clip, provider_environment, resolve_binary, write_private
from orchestrator.core.config import Settings

PROVIDER_NAME = "orchestrator"
# "unexpected status 401 Unauthorized: ..." / "exceeded retry limit, last status: 429 Too Many Requests"
HTTP_STATUS = re.compile(r"\bstatus:? (\d{3})\b")
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class CodexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=200)
    sandbox: Literal["read-only", "workspace-write", "danger-full-access"] = "workspace-write"
    delegation: bool = True
    mcp_transport: Literal["http", "stdio"] = "http"
    config: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=50)


def toml_value(value: Any) -> str:
    """A TOML inline value for `-c key=value` (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{toml_key(str(k))}={toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else json.dumps(key)


def http_status(message: str) -> int | None:
    found = HTTP_STATUS.search(message)
    return int(found.group(1)) if found else None


class CodexAgent(Agent):
    name = "codex"
    options_model = CodexOptions
    sandbox = SandboxProfile(memory_mb=2048, pids=512, max_memory_mb=8192, max_pids=4096)

    def __init__(self, settings: Settings) -> None:
        self.configured_bin = settings.orchestrator_codex_bin

    def sandbox_paths(self) -> list[str]:
        return install_dirs(resolve_binary(self.configured_bin))

    def unavailable_reason(self) -> str | None:
        if resolve_binary(self.configured_bin) is None:
            return (
                f"the Codex CLI ({self.configured_bin!r}) was not found; install it with "
                "`npm install -g @openai/codex` or set ORCHESTRATOR_CODEX_BIN to its path"
            )
        return None

    def launch(self, ctx: WorkerContext) -> LaunchSpec:
        binary = resolve_binary(self.configured_bin)
        if binary is None:
            raise RuntimeError(self.unavailable_reason())
        options = CodexOptions.model_validate(ctx.options)
        provider = provider_environment(("OPENAI_",))
        argv = [binary, "exec"]
        if ctx.resume_session:
            argv += ["resume", ctx.resume_session]
        argv += ["--json", "--skip-git-repo-check", "-s", options.sandbox, "-C", str(ctx.workdir)]
        if options.model:
            argv += ["-m", options.model]
        config: dict[str, Any] = {}
        base_url = provider.get("OPENAI_BASE_URL")
        if base_url:
            config[f"model_providers.{PROVIDER_NAME}"] = {
                "name": PROVIDER_NAME,
                "base_url": base_url,
                "env_key": "OPENAI_API_KEY",
                "wire_api": "responses",
            }
            config["model_provider"] = PROVIDER_NAME
        if options.delegation and options.mcp_transport == "http":
            # Served by the API process: connected before Codex's first model request (a stdio
            # server needs ~1 s of Python start-up, and Codex does not wait for it).
            config["mcp_servers.orchestrator"] = {
                "url": f"{ctx.api_url}/mcp/",
                "bearer_token_env_var": "ORCHESTRATOR_TOKEN",
            }
        elif options.delegation:
            config["mcp_servers.orchestrator"] = {
                "command": sys.executable,
                "args": ["-m", "orchestrator.mcp"],
                "env": {
                    "ORCHESTRATOR_URL": ctx.api_url,
                    "ORCHESTRATOR_TOKEN": ctx.token,
                    "ORCHESTRATOR_JOB_ID": ctx.job_id,
                    "ORCHESTRATOR_WORKER_ID": ctx.worker_id,
                    "ORCHESTRATOR_DEPTH": str(ctx.depth),
                },
            }
        codex_home = ctx.home / ".codex"
        codex_home.mkdir(parents=True, exist_ok=True)
        write_private(
            codex_home / "config.toml", "".join(f"{key} = {toml_value(v)}\n" for key, v in config.items())
        )
        for key, value in options.config.items():
            argv += ["-c", f"{key}={toml_value(value)}"]
        task = "Continue the task." if ctx.resume_session else ctx.task
        argv.append(" " + task if task.startswith("-") else task)
        env = base_environment(ctx)
        env.update(provider)
        env["CODEX_HOME"] = str(codex_home)
        return LaunchSpec(argv=argv, env=env, stdin_text="")

    def parse_events(self, line: str) -> list[AgentEvent]:
        data = json_object(line)
        if data is None:
            return []
        kind = data.get("type")
        if kind == "thread.started":
            return [AgentEvent("init", {"session_id": data.get("thread_id")})]
        if kind == "item.completed":
            item = data.get("item") or {}
            itype = item.get("type")
            if itype == "agent_message":
                return [AgentEvent("message", {"text": _clip(item.get("text"))})]
            if itype == "command_execution":
                return [
                    AgentEvent(
                        "tool_use",
                        {
                            "name": "exec_command",
                            "input": {"command": _clip(item.get("command"), 2000)},
                            "exit_code": item.get("exit_code"),
                        },
                    )
                ]
            if itype in ("file_change", "mcp_tool_call", "web_search"):
                return [AgentEvent("tool_use", {"name": itype, "input": _clip(json.dumps(item), 2000)})]
            if itype == "error":  # a warning (e.g. unknown model metadata), not a failure
                return [AgentEvent("warning", {"text": _clip(item.get("message"))})]
            return []
        if kind == "turn.completed":
            return [AgentEvent("result", {"is_error": False, "usage": data.get("usage") or {}})]
        if kind == "turn.failed":
            error = data.get("error") or {}
            message = str((error.get("message") if isinstance(error, dict) else error) or "")
            result: dict[str, Any] = {"is_error": True, "result": _clip(message)}
            status = http_status(message)
            if status is not None:
                result["api_error_status"] = status
            return [AgentEvent("result", result)]
        if kind == "error":  # also codex's "Reconnecting... n/5 (...)" notes before it gives up
            message = str(data.get("message") or "")
            return [AgentEvent("api_error", {"status": http_status(message), "text": _clip(message)})]
        return []

    def parse_line(self, line: str) -> AgentEvent | None:
        events = self.parse_events(line)
        return events[0] if events else None

    def outcome(self, result: dict[str, Any] | None, exit_code: int | None) -> Outcome | None:
        if not result or "is_error" not in result:
            return None
        if result["is_error"]:
            message = str(result.get("result") or "").strip() or "no message"
            status = result.get("api_error_status")
            if status in (401, 403):
                return Outcome(False, f"authentication failed: {message}")
            if isinstance(status, int):
                return Outcome(False, f"api error {status}: {message}")
            return Outcome(False, f"turn failed: {message}")
        if exit_code not in (0, None):
            return None
        return Outcome(True, "completed")
