"""`codex`: the OpenAI Codex CLI, headless (`codex exec --json`), its JSONL events parsed.

Codex ignores OPENAI_BASE_URL: when the server sets it, the provider is configured as
`model_providers.orchestrator={...}` with `model_provider="orchestrator"` (Responses API). Each worker
gets its own CODEX_HOME, whose `config.toml` (mode 0600) holds the provider and the orchestrator's MCP
server: that server's settings carry the worker's delegated token, which must not be in argv.
A rejected request ends the turn with `turn.failed` ("unexpected status 401 Unauthorized: ...", after
codex's own reconnect attempts); its HTTP status decides the reason. Facts: docs/agent-cli-harness.md.

Codex's own sandbox is off by default (`--dangerously-bypass-approvals-and-sandbox`): the orchestrator
confines the worker itself (its own worktree, HOME and token), and Codex's sandbox fails silently on
hosts with bubblewrap installed: Codex then wraps each command in `bwrap ... codex-linux-sandbox`, a
helper it refuses to create when CODEX_HOME is under /tmp and that cannot nest inside another sandbox.
The command does not run, Codex tells only the model, the model says "Done" and the run exits 0.
A second sandbox inside the worker adds nothing but that silent failure; `sandbox: read-only` or
`workspace-write` stays available for hosts where it works. Whatever the mode, a command Codex reports
as declined (or failed without ever starting) fails the worker (`outcome`), and a command that ran and
exited non-zero is an `agent.command_failed` event (the agent saw its exit code and may have handled it).
"""

from __future__ import annotations

import json
import re
import sys
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
from orchestrator.agents.claude_code import _clip, provider_environment, write_private
from orchestrator.core.config import Settings

PROVIDER_NAME = "orchestrator"
# "unexpected status 401 Unauthorized: ..." / "exceeded retry limit, last status: 429 Too Many Requests"
HTTP_STATUS = re.compile(r"\bstatus:? (\d{3})\b")
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Codex's note (on stderr) that its sandbox helper could not be set up: sandboxed commands will not run.
SANDBOX_HELPER_WARNING = "could not create PATH aliases"
# Codex's log line (stderr) for a tool call it refused to run (e.g. an escalation under approval
# policy "never"): nothing on the JSON stream says so, only the model is told.
REFUSED_TOOL = re.compile(r"\bcodex_core::tools::router: error=(.*)$")
# How long Codex waits for the delegation MCP server before its first model request: marked required,
# so the tools are in every request (also on a loaded host), and a server that never answers fails the run.
MCP_STARTUP_TIMEOUT_SECONDS = 120


class CodexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=200)
    # "none": Codex's own sandbox off (see the module docstring); the others are Codex's `-s` modes.
    sandbox: Literal["none", "read-only", "workspace-write", "danger-full-access"] = "none"
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


def command_events(item: dict[str, Any]) -> list[AgentEvent]:
    """A finished shell command: a `tool_use`, plus `command_failed` when it ran and exited non-zero,
    or `tool_refused` when it never ran (declined, or failed with no exit code: it never started)."""
    status, exit_code = item.get("status"), item.get("exit_code")
    use: dict[str, Any] = {
        "name": "exec_command",
        "input": {"command": _clip(item.get("command"), 2000)},
        "exit_code": exit_code,
        "status": status,
    }
    events = [AgentEvent("tool_use", use)]
    detail = {
        "command": _clip(item.get("command"), 500),
        "status": status,
        "exit_code": exit_code,
        "output": _clip(item.get("aggregated_output"), 500),
    }
    if status == "declined" or (status == "failed" and not isinstance(exit_code, int)):
        events.append(AgentEvent("tool_refused", detail))
    elif status == "failed" or (isinstance(exit_code, int) and exit_code != 0):
        events.append(AgentEvent("command_failed", detail))
    return events


class CodexAgent(CliAgent):
    name = "codex"
    options_model = CodexOptions
    cli_title = "the Codex CLI"
    install_hint = "`npm install -g @openai/codex` or set ORCHESTRATOR_CODEX_BIN to its path"

    def __init__(self, settings: Settings) -> None:
        self.configured_bin = settings.orchestrator_codex_bin

    def launch(self, ctx: WorkerContext) -> LaunchSpec:
        binary = resolve_binary(self.configured_bin)
        if binary is None:
            raise RuntimeError(self.unavailable_reason())
        options = CodexOptions.model_validate(ctx.options)
        provider = provider_environment(("OPENAI_",))
        argv = [binary, "exec"]
        if ctx.resume_session:
            argv += ["resume", ctx.resume_session]
        argv += ["--json", "--skip-git-repo-check"]
        if options.sandbox == "none":
            argv.append("--dangerously-bypass-approvals-and-sandbox")
        else:
            argv += ["-s", options.sandbox]
        argv += ["-C", str(ctx.workdir)]
        if options.model:
            argv += ["-m", options.model]
        config = _codex_config(ctx, options, provider.get("OPENAI_BASE_URL"))
        codex_home = ctx.home / ".codex"
        if codex_home.is_symlink():  # left by the agent's last run: never written through
            codex_home.unlink()
        codex_home.mkdir(parents=True, exist_ok=True)
        write_private(
            codex_home / "config.toml", "".join(f"{key} = {toml_value(v)}\n" for key, v in config.items())
        )
        for key, value in options.config.items():
            argv += ["-c", f"{key}={toml_value(value)}"]
        # `-`: the prompt is read from stdin, never put in argv (readable by every local user in
        # /proc/PID/cmdline) or the environment.
        task = "Continue the task." if ctx.resume_session else ctx.task
        argv.append("-")
        env = base_environment(ctx, with_task=False)
        env.update(provider)
        env["CODEX_HOME"] = str(codex_home)
        return LaunchSpec(argv=argv, env=env, stdin_text=task)

    def parse_events(self, line: str) -> list[AgentEvent]:
        data = json_object(line)
        if data is None:
            refused = REFUSED_TOOL.search(line)
            if refused:
                reason = _clip(refused.group(1).strip(), 500)
                return [AgentEvent("tool_refused", {"status": "refused", "output": reason})]
            if line.startswith("Error: "):  # Codex could not start (bad config, ...): it exits 1
                message = _clip(line[len("Error: ") :].strip(), 500)
                return [AgentEvent("result", {"is_error": True, "result": message, "startup_error": True})]
            if SANDBOX_HELPER_WARNING in line:
                return [AgentEvent("warning", {"text": _clip(line)})]
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
                return command_events(item)
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
        refused = result.get("refused_tools")
        if not result["is_error"] and isinstance(refused, list) and refused:
            first = refused[0] if isinstance(refused[0], dict) else {}
            command = f" {first['command']!r}" if first.get("command") else ""
            return Outcome(
                False,
                f"codex did not run {len(refused)} tool call(s) the model asked for; first{command} "
                f"({first.get('status') or 'failed'}): {first.get('output') or 'no output'}",
            )
        if result["is_error"]:
            message = str(result.get("result") or "").strip() or "no message"
            status = result.get("api_error_status")
            if status in (401, 403):
                return Outcome(False, f"authentication failed: {message}")
            if isinstance(status, int):
                return Outcome(False, f"api error {status}: {message}")
            if result.get("startup_error"):
                return Outcome(False, f"codex could not start: {message}")
            return Outcome(False, f"turn failed: {message}")
        if exit_code not in (0, None):
            return None
        return Outcome(True, "completed")


def _codex_config(ctx: WorkerContext, options: CodexOptions, base_url: str | None) -> dict[str, Any]:
    """The worker's config.toml: the model provider when OPENAI_BASE_URL is set, and the
    orchestrator's MCP server when the worker may delegate."""
    config: dict[str, Any] = {}
    if base_url:
        config[f"model_providers.{PROVIDER_NAME}"] = {
            "name": PROVIDER_NAME,
            "base_url": base_url,
            "env_key": "OPENAI_API_KEY",
            "wire_api": "responses",
        }
        config["model_provider"] = PROVIDER_NAME
    if options.delegation and options.mcp_transport == "http" and not ctx.api_socket:
        # Served by the API process: connected before Codex's first model request (a stdio
        # server must start a Python process first, and Codex does not wait for it).
        config["mcp_servers.orchestrator"] = {
            "url": f"{ctx.api_url}/mcp/",
            "bearer_token_env_var": "ORCHESTRATOR_TOKEN",
            "required": True,
            "startup_timeout_sec": MCP_STARTUP_TIMEOUT_SECONDS,
        }
    elif options.delegation:
        config["mcp_servers.orchestrator"] = {
            "command": sys.executable,
            "args": ["-m", "orchestrator.mcp"],
            "env": {
                **api_environment(ctx),
                "ORCHESTRATOR_TOKEN": ctx.token,
                "ORCHESTRATOR_JOB_ID": ctx.job_id,
                "ORCHESTRATOR_WORKER_ID": ctx.worker_id,
                "ORCHESTRATOR_DEPTH": str(ctx.depth),
            },
            "required": True,
            "startup_timeout_sec": MCP_STARTUP_TIMEOUT_SECONDS,
        }
    return config
