"""`codex`: the OpenAI Codex CLI, headless (`codex exec --json`), its JSONL events parsed.

Codex ignores OPENAI_BASE_URL: when the server sets it, the provider is configured with
`-c model_providers.orchestrator={...} -c model_provider=orchestrator` (Responses API). Each worker
gets its own CODEX_HOME. The orchestrator's MCP server is configured with `-c mcp_servers...`.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.agents.base import Agent, AgentEvent, LaunchSpec, Outcome, WorkerContext, base_environment
from orchestrator.agents.claude_code import _clip, provider_environment, resolve_binary
from orchestrator.core.config import Settings


class CodexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=200)
    sandbox: Literal["read-only", "workspace-write", "danger-full-access"] = "workspace-write"
    delegation: bool = True
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
        return "{" + ",".join(f"{k}={toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


class CodexAgent(Agent):
    name = "codex"
    options_model = CodexOptions

    def __init__(self, settings: Settings) -> None:
        self.configured_bin = settings.orchestrator_codex_bin

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
        base_url = provider.get("OPENAI_BASE_URL")
        if base_url:
            spec = {"name": "orchestrator", "base_url": base_url, "env_key": "OPENAI_API_KEY"}
            spec["wire_api"] = "responses"
            argv += ["-c", f"model_providers.orchestrator={toml_value(spec)}"]
            argv += ["-c", "model_provider=orchestrator"]
        if options.delegation:
            server = {
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
            argv += ["-c", f"mcp_servers.orchestrator={toml_value(server)}"]
        for key, value in options.config.items():
            argv += ["-c", f"{key}={toml_value(value)}"]
        task = "Continue the task." if ctx.resume_session else ctx.task
        argv.append(" " + task if task.startswith("-") else task)
        env = base_environment(ctx)
        env.update(provider)
        env["CODEX_HOME"] = str(ctx.home / ".codex")
        (ctx.home / ".codex").mkdir(parents=True, exist_ok=True)
        return LaunchSpec(argv=argv, env=env, stdin_text="")

    def parse_events(self, line: str) -> list[AgentEvent]:
        if not line.startswith("{"):
            return []
        try:
            data = json.loads(line)
        except ValueError:
            return []
        if not isinstance(data, dict):
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
            message = error.get("message") if isinstance(error, dict) else str(error)
            return [AgentEvent("result", {"is_error": True, "result": _clip(message)})]
        if kind == "error":
            return [AgentEvent("api_error", {"text": _clip(data.get("message"))})]
        return []

    def parse_line(self, line: str) -> AgentEvent | None:
        events = self.parse_events(line)
        return events[0] if events else None

    def outcome(self, result: dict[str, Any] | None, exit_code: int | None) -> Outcome | None:
        if not result or "is_error" not in result:
            return None
        if result["is_error"]:
            return Outcome(False, f"turn failed: {result.get('result') or 'no message'}")
        if exit_code not in (0, None):
            return None
        return Outcome(True, "completed")
