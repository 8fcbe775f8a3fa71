"""Agent profiles known to this server: built-ins plus those in ORCHESTRATOR_AGENTS_FILE (TOML).

[agents.shell]
type = "command"
command = ["bash", "-c", "cat; echo done"]
env = { FOO = "bar" }
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from orchestrator.agents.base import Agent
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
        profiles[name] = CommandAgent(name, command, spec.get("env"), resolver=resolver)
    return profiles
