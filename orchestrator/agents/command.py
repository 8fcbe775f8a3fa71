"""`command`: any CLI agent, with its command line configured on the server, never in a request."""

from __future__ import annotations

from orchestrator.agents.base import Agent, LaunchSpec, WorkerContext, base_environment


class CommandAgent(Agent):
    def __init__(
        self, name: str, command: list[str], env: dict[str, str] | None = None, *, resolver: bool = False
    ) -> None:
        if not command:
            raise ValueError(f"agent profile {name!r}: command must not be empty")
        self.name = name
        self.command = list(command)
        self.env = dict(env or {})
        # Whether the engine may hand it a merge conflict (engine/integrate.py): a command is a
        # script, which may not know what to do with one; a profile says so with `resolver = true`.
        self.resolver = resolver

    def launch(self, ctx: WorkerContext) -> LaunchSpec:
        env = base_environment(ctx)
        env.update(self.env)
        return LaunchSpec(argv=list(self.command), env=env, stdin_text=ctx.task)
