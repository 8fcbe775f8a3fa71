"""Agent profiles known to this server: built-ins plus those in ORCHESTRATOR_AGENTS_FILE (TOML).

[agents.shell]
type = "command"
command = ["bash", "-c", "cat; echo done"]
env = { FOO = "bar" }
# the sandbox (docs/SANDBOX.md): limits, their maximum per job, network and extra binds
memory_mb = 1024
pids = 512
max_memory_mb = 4096
max_pids = 2048
network = "none"          # default "on"
ro_binds = ["/srv/cache"]
rw_binds = ["/srv/scratch"]
max_output_mb = 256       # output stored per worker, then a marker line
max_file_mb = 1024        # RLIMIT_FSIZE of the agent's processes; bigger files are not committed
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from orchestrator.agents.base import Agent, SandboxProfile
from orchestrator.agents.claude_code import ClaudeCodeAgent
from orchestrator.agents.codex import CodexAgent
from orchestrator.agents.command import CommandAgent
from orchestrator.agents.simulated import SimulatedAgent
from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest, FieldInvalid


class AgentRegistry:
    def __init__(self, agents: dict[str, Agent], default: str) -> None:
        if default not in agents:
            raise ValueError(f"default agent {default!r} is not a configured profile ({', '.join(agents)})")
        self.agents = agents
        self.default = default

    @classmethod
    def from_settings(cls, settings: Settings) -> AgentRegistry:
        agents: dict[str, Agent] = {
            "simulated": SimulatedAgent(),
            "claude-code": ClaudeCodeAgent(settings),
            "codex": CodexAgent(settings),
        }
        if settings.orchestrator_agents_file is not None:
            agents.update(load_profiles(settings.orchestrator_agents_file))
        return cls(agents, settings.orchestrator_default_agent)

    def get(self, name: str) -> Agent:
        return self.agents[name]

    def validate_limits(self, name: str, limits: dict[str, Any]) -> dict[str, Any]:
        """A job's `limits`, checked against its agent profile's maxima (400 above them)."""
        return _limits_of(self.agents[name], limits)

    def validate(self, name: str | None, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        chosen = name or self.default
        agent = self.agents.get(chosen)
        if agent is None:
            known = ", ".join(sorted(self.agents))
            raise FieldInvalid("agent", f"unknown agent {chosen!r}; known agents: {known}", chosen)
        reason = agent.unavailable_reason()
        if reason is not None:
            raise BadRequest(f"Agent {chosen!r} cannot run on this server: {reason}")
        return chosen, agent.validate_options(options)


def _limits_of(agent: Agent, limits: dict[str, Any]) -> dict[str, Any]:
    profile = agent.sandbox
    memory, pids = limits.get("memory_mb"), limits.get("pids")
    if memory is not None and memory > profile.memory_ceiling:
        ceiling = profile.memory_ceiling
        raise BadRequest(f"limits.memory_mb {memory} is above agent {agent.name!r}'s maximum ({ceiling} MiB)")
    if pids is not None and pids > profile.pids_ceiling:
        ceiling = profile.pids_ceiling
        raise BadRequest(f"limits.pids {pids} is above the maximum of agent {agent.name!r} ({ceiling})")
    if limits.get("network") == "on" and not profile.network:
        raise BadRequest(f"agent {agent.name!r} runs without network; a job cannot turn it on")
    return limits


def load_profiles(path: Path) -> dict[str, Agent]:
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    profiles: dict[str, Agent] = {}
    for name, spec in data.get("agents", {}).items():
        kind = spec.get("type", "command")
        if kind != "command":
            raise ValueError(f"agent profile {name!r}: unknown type {kind!r}")
        command = spec.get("command")
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise ValueError(f"agent profile {name!r}: command must be a list of strings")
        resolver = spec.get("resolver", False)
        if not isinstance(resolver, bool):
            raise ValueError(f"agent profile {name!r}: resolver must be true or false")
        agent = CommandAgent(name, command, spec.get("env"), resolver=resolver)
        agent.sandbox = sandbox_profile(name, spec)
        profiles[name] = agent
    return profiles


def sandbox_profile(name: str, spec: dict[str, Any]) -> SandboxProfile:
    """A profile's sandbox settings from its TOML table, checked (a typo must not loosen it)."""
    values: dict[str, Any] = {}
    for key in ("memory_mb", "pids", "max_memory_mb", "max_pids", "max_output_mb", "max_file_mb"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"agent profile {name!r}: {key} must be a positive integer")
            values[key] = value
    if "network" in spec:
        if spec["network"] not in ("on", "none"):
            raise ValueError(f'agent profile {name!r}: network must be "on" or "none"')
        values["network"] = spec["network"] == "on"
    for key in ("ro_binds", "rw_binds"):
        if key in spec:
            paths = spec[key]
            if not isinstance(paths, list) or not all(
                isinstance(p, str) and p.startswith("/") for p in paths
            ):
                raise ValueError(f"agent profile {name!r}: {key} must be a list of absolute paths")
            values[key] = tuple(paths)
    profile = SandboxProfile(**values)
    if profile.memory_mb > profile.memory_ceiling or profile.pids > profile.pids_ceiling:
        raise ValueError(f"agent profile {name!r}: a default limit is above its maximum")
    return profile
