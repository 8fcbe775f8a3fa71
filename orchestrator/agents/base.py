"""How an agent CLI is launched and how its output is understood.

An agent profile turns a worker's context into a command line and environment, and may turn
lines of the worker's output into structured events (tool uses, results, cost).
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.core.errors import FieldInvalid
from orchestrator.core.unix_http import SOCKET_ENV


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class WorkerContext:
    job_id: str
    worker_id: str
    worker_index: int
    worker_count: int
    depth: int
    task: str
    options: dict[str, Any]
    workdir: Path
    home: Path
    run_dir: Path
    api_url: str
    token: str
    # Set when the server listens on a unix socket (`uvicorn --uds`): api_url is then
    # http://localhost and clients connect here (ORCHESTRATOR_API_SOCKET).
    api_socket: str | None = None
    max_turns: int | None = None
    # Set when the engine restarts a parked worker: continue this agent session.
    resume_session: str | None = None


@dataclass
class LaunchSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin_text: str | None = None


@dataclass(frozen=True)
class SandboxProfile:
    """How a profile's workers are confined (docs/SANDBOX.md): default and maximum limits, the
    network, and extra binds. Set on the server (built-ins, the agents TOML), never by a request."""

    memory_mb: int = 1024
    pids: int = 512
    max_memory_mb: int | None = None  # what a job's `limits` may ask for at most (None: default x4)
    max_pids: int | None = None
    network: bool = True
    ro_binds: tuple[str, ...] = ()
    rw_binds: tuple[str, ...] = ()
    # The disk a worker may fill: the engine stores at most max_output_mb of its output (then one
    # marker line), and no file its processes write (their stdout file too) grows past
    # max_file_mb (RLIMIT_FSIZE: EFBIG / SIGXFSZ); the final commit leaves bigger files out.
    max_output_mb: int = 256
    max_file_mb: int = 1024

    @property
    def memory_ceiling(self) -> int:
        return self.max_memory_mb or self.memory_mb * 4

    @property
    def pids_ceiling(self) -> int:
        return self.max_pids or self.pids * 4


@dataclass(frozen=True)
class AgentEvent:
    """Something an agent reported on its output stream."""

    kind: str  # "tool_use", "message", "result", "init", ...
    data: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """How an agent's run ended, as the agent itself reported it (not just the exit code).

    `retryable` means a rate limit or overload: the engine parks the worker and restarts it with
    `resume_session` after `retry_after` seconds (or the governor's backoff), instead of failing it.
    """

    ok: bool
    reason: str
    retryable: bool = False
    retry_after: float | None = None
    resume_session: str | None = None


class Agent(ABC):
    name: str
    options_model: ClassVar[type[BaseModel]] = NoOptions
    sandbox: SandboxProfile = SandboxProfile()

    def sandbox_paths(self) -> list[str]:
        """Directories outside the system ones the agent's program needs, bound read-only (its
        installation, when that is not under /usr)."""
        return []

    def validate_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.options_model.model_validate(raw).model_dump(exclude_none=True)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'agent_options'}: {err['msg']}"
                for err in exc.errors()
            )
            raise FieldInvalid(
                "agent_options", f"invalid options for agent {self.name!r}: {problems}", raw
            ) from exc

    def unavailable_reason(self) -> str | None:
        """Why this agent cannot run on this server (e.g. its CLI is not installed), or None."""
        return None

    @abstractmethod
    def launch(self, ctx: WorkerContext) -> LaunchSpec: ...

    def parse_line(self, line: str) -> AgentEvent | None:
        return None

    def parse_events(self, line: str) -> list[AgentEvent]:
        """All events of one output line (one by default; an agent may report several)."""
        event = self.parse_line(line)
        return [] if event is None else [event]

    def outcome(self, result: dict[str, Any] | None, exit_code: int | None) -> Outcome | None:
        """Decide success from the run's parsed result; None leaves it to the exit code."""
        return None

    def account_key(self) -> str | None:
        """Which provider account this agent's workers share (for the rate-limit governor), if any."""
        return None


class CliAgent(Agent):
    """An agent that runs an installed command-line program: `configured_bin` is a name looked up
    on PATH or a path; the sandbox binds its installation."""

    configured_bin: str
    cli_title: ClassVar[str]  # e.g. "the Codex CLI"
    install_hint: ClassVar[str]  # how to install it, or the setting naming its path
    sandbox = SandboxProfile(memory_mb=2048, pids=512, max_memory_mb=8192, max_pids=4096)

    def sandbox_paths(self) -> list[str]:
        return install_dirs(resolve_binary(self.configured_bin))

    def unavailable_reason(self) -> str | None:
        if resolve_binary(self.configured_bin) is None:
            missing = f"{self.cli_title} ({self.configured_bin!r}) was not found"
            return f"{missing}; install it with {self.install_hint}"
        return None


def resolve_binary(configured: str) -> str | None:
    if os.sep in configured:
        path = Path(configured).expanduser()
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(configured)


def json_object(line: str) -> dict[str, Any] | None:
    """The JSON object on one output line of a JSON-lines agent, or None for anything else."""
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def install_dirs(binary: str | None) -> list[str]:
    """The installation a CLI binary belongs to (`PREFIX` of `PREFIX/bin/NAME`, and of the file
    it links to), for a sandbox to bind read-only; nothing under /usr (bound anyway)."""
    if binary is None:
        return []
    found = []
    for path in (Path(binary).absolute(), Path(binary).resolve()):
        prefix = str(path.parent.parent)
        if prefix != "/" and not prefix.startswith("/usr/") and prefix != "/usr":
            found.append(prefix)
    return sorted(set(found))


def api_environment(ctx: WorkerContext) -> dict[str, str]:
    """How a worker, and the tools it starts, reach the API."""
    env = {"ORCHESTRATOR_URL": ctx.api_url}
    if ctx.api_socket:
        env[SOCKET_ENV] = ctx.api_socket
    return env


def base_environment(ctx: WorkerContext, *, with_task: bool = True) -> dict[str, str]:
    """What every worker gets, whatever the agent. The task is also in `ORCHESTRATOR_TASK` for
    command profiles (bounded to 64 KiB, under the kernel's 128 KiB per environment string);
    the real agent CLIs read it on stdin only (`with_task=False`)."""
    env = {
        **api_environment(ctx),
        "ORCHESTRATOR_TOKEN": ctx.token,
        "ORCHESTRATOR_JOB_ID": ctx.job_id,
        "ORCHESTRATOR_WORKER_ID": ctx.worker_id,
        "ORCHESTRATOR_DEPTH": str(ctx.depth),
        "ORCHESTRATOR_TASK": ctx.task,
        "WORKER_INDEX": str(ctx.worker_index),
        "WORKER_COUNT": str(ctx.worker_count),
        "HOME": str(ctx.home),
        "XDG_CONFIG_HOME": str(ctx.home / ".config"),
        "XDG_CACHE_HOME": str(ctx.home / ".cache"),
    }
    if not with_task:
        del env["ORCHESTRATOR_TASK"]
    return env
