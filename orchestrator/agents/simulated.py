"""`simulated`: a real process that behaves like an agent without an LLM (see simulated_worker)."""

from __future__ import annotations

import json
import sys
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.agents.base import Agent, LaunchSpec, SandboxProfile, WorkerContext, base_environment


class Subtask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_description: str = Field(min_length=1)
    worker_count: int = Field(default=1, ge=1)
    agent_options: dict[str, Any] = Field(default_factory=dict)


class SimulatedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    duration_seconds: float = Field(default=2.0, ge=0, le=24 * 3600)
    exit_code: int = Field(default=0, ge=0, le=255)
    subtasks: list[str | Subtask] = Field(default_factory=list, max_length=50)
    progress_interval_seconds: float = Field(default=0.5, gt=0, le=60)
    # A waiting worker learns of a child's end from the child's events stream; it re-reads the
    # child's status this often anyway, in case the stream is quiet or cannot be opened.
    wait_poll_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Files to write in the worktree (path relative to it: content), before the work starts.
    files: dict[str, str] = Field(default_factory=dict, max_length=100)
    # As a conflict resolver: keep our side, their side, or both (ours then theirs).
    resolve: Literal["ours", "theirs", "both"] | None = None

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: dict[str, str]) -> dict[str, str]:
        for name in files:
            path = PurePosixPath(name)
            if not name or path.is_absolute() or ".." in path.parts or path.parts[:1] == (".git",):
                raise ValueError(f"file path {name!r} must be relative to the worktree, without '..' or .git")
        return files


class SimulatedAgent(Agent):
    name = "simulated"
    options_model = SimulatedOptions
    sandbox = SandboxProfile(memory_mb=128, pids=512)

    def launch(self, ctx: WorkerContext) -> LaunchSpec:
        # Options on stdin: a request may hold up to 2 MiB of them, more than one environment
        # string may (128 KiB). The task stays in ORCHESTRATOR_TASK (64 KiB at most).
        return LaunchSpec(
            argv=[sys.executable, "-m", "orchestrator.agents.simulated_worker"],
            env=base_environment(ctx),
            stdin_text=json.dumps(ctx.options),
        )
