"""The engine's shared vocabulary: its tuning constants, what every phase reads and never
changes (`EngineContext`), the record of each live worker (`Supervised`), and the `Supervisor`
that holds those records and wakes the main loop. Every phase imports this module; it imports
no phase."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.agents.base import Agent
from orchestrator.agents.registry import AgentRegistry
from orchestrator.core.address import ApiAddress
from orchestrator.core.config import Settings
from orchestrator.db.session import Database
from orchestrator.engine.logs import LogCursor
from orchestrator.engine.queries.rows import JobRow
from orchestrator.executors.cgroups import Limits
from orchestrator.executors.local import (
    EXIT_FILE,
    OUTPUT_FILE,
    PID_FILE,
    STDIN_FILE,
    LocalExecutor,
    WorkerProcess,
)

log = logging.getLogger("orchestrator.engine")

WORKER_TOKEN_SCOPES = ["jobs:read", "jobs:write", "supervisor:read"]
START_BATCH = 50
IDLE_SLACK = 5  # jobs claimed / IDLE workers read beyond a depth's free slots, for those a pass skips
LOG_INTERVAL_SECONDS = 0.25
RECLAIM_INTERVAL_SECONDS = 2.0
SQLITE_WATCH_SECONDS = 0.05
BLOCKED_PASS_GAP_SECONDS = 0.05  # the least time between blocked passes (engine.py)
STOP_STEP_SECONDS = 5.0
LAUNCH_THREADS = max(2, os.cpu_count() or 2)  # the blocking part of a start is short: one per core
WRAPPER_FILES = frozenset({OUTPUT_FILE, EXIT_FILE, PID_FILE, STDIN_FILE})
PIDS_CHECK_SECONDS = 2.0  # how often running workers' process-limit counters are read
LAUNCH_CHUNK = 16  # workers started per launcher-thread call, at least


def worker_limits(agent: Agent | None, job_limits: dict[str, Any] | None) -> Limits:
    """A worker's cgroup limits: its job's `limits` (checked at submit), else its profile's."""
    asked = job_limits or {}
    if agent is None:
        return Limits(memory_mb=int(asked.get("memory_mb", 1024)), pids=int(asked.get("pids", 512)))
    return Limits(
        memory_mb=int(asked.get("memory_mb", agent.sandbox.memory_mb)),
        pids=int(asked.get("pids", agent.sandbox.pids)),
        file_mb=agent.sandbox.max_file_mb,
    )


@dataclass(frozen=True)
class EngineContext:
    """Who the engine is and what it works with: set once, read by every phase."""

    settings: Settings
    db: Database
    agents: AgentRegistry
    executor: LocalExecutor
    address: ApiAddress
    id: str
    actor: str
    runs_dir: Path  # a worker's run dir: its wrapper's files, its HOME
    workspaces_dir: Path  # a worker's worktree (or empty work dir)

    def account_of(self, agent_name: str) -> str | None:
        """The provider account an agent profile's workers share (rate limits), if any."""
        agent = self.agents.agents.get(agent_name)
        return agent.account_key() if agent is not None else None


@dataclass
class AgentRun:
    """What a worker's agent has said so far in its output (ingest writes it, endings read it)."""

    session_id: str | None = None
    last_message: str | None = None
    refused: list[Any] | None = None
    result: dict[str, Any] | None = None  # its final result event: the run is finishing
    api_retry: dict[str, Any] | None = None


@dataclass(frozen=True)
class Supervised:
    """One live worker process this engine supervises, and what its phases need to know of it."""

    proc: WorkerProcess
    job_id: str
    agent: str
    depth: int
    in_repository: bool | None  # None: not known (a worker found ended by recovery)
    memory_mb: int  # reserved while it runs (memory-aware admission)
    cursor: LogCursor
    deadline: float | None = None  # monotonic; None: no timeout, or it has been applied
    run: AgentRun = field(default_factory=AgentRun)


class Supervisor:
    """The live workers of this engine, those that exited since the last pass, and the wake-up
    of the main loop: the state the phases share."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.live: dict[str, Supervised] = {}
        self.exited: list[WorkerProcess] = []
        self.wake = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.repo_locks: dict[str, asyncio.Lock] = {}
        self.spend_changed = False  # an agent reported spend: budgets are checked at once

    def supervise(
        self,
        proc: WorkerProcess,
        job: JobRow,
        *,
        offset: int,
        lines: int,
        memory_mb: int | None = None,
    ) -> Supervised:
        """Watch a started (or adopted) process; its exit wakes the main loop."""
        if memory_mb is None:  # adopted: its cgroup says
            memory_mb = 0 if proc.exited else self._memory_limit_mb(proc.worker_id, job)
        deadline = None
        if job.timeout_seconds:
            deadline = time.monotonic() + job.timeout_seconds
            self.wake_in(job.timeout_seconds)
        record = Supervised(
            proc=proc,
            job_id=job.id,
            agent=job.agent,
            depth=job.depth,
            in_repository=bool(job.repository),
            memory_mb=memory_mb,
            cursor=LogCursor(proc.output_path, offset=offset, lines=lines),
            deadline=deadline,
        )
        self.live[proc.worker_id] = record
        self.ctx.executor.watch(proc, self.on_exit)
        return record

    def _memory_limit_mb(self, worker_id: str, job: JobRow) -> int:
        agent = self.ctx.agents.agents.get(job.agent)
        memory = self.ctx.executor.memory_limit_mb(worker_id)
        return memory or (worker_limits(agent, job.limits).memory_mb if agent else 0)

    def on_exit(self, proc: WorkerProcess) -> None:
        self.exited.append(proc)
        self.wake.set()

    def forget(self, batch: list[WorkerProcess]) -> None:
        for proc in batch:
            self.live.pop(proc.worker_id, None)

    def repo_lock(self, repository: str) -> asyncio.Lock:
        return self.repo_locks.setdefault(repository, asyncio.Lock())

    def wake_in(self, seconds: float) -> None:
        """Come back after `seconds` even if nothing else happens."""
        if self.loop is not None:
            self.loop.call_later(seconds, self.wake.set)

    def reserved_memory_mb(self) -> int:
        """The memory limits of the running workers, which their use may grow to."""
        return sum(s.memory_mb for s in self.live.values() if not s.proc.exited)
