"""The engine: claims jobs, gives workers slots, starts and supervises their processes, and
decides how jobs end. Several engines (processes, hosts) share one database; each job has exactly
one owning engine, and a dead engine's jobs are taken over by a live one.

The database holds what should be (a worker PAUSED, TERMINATED, ...); the engine that owns the
worker's process makes reality follow, and records what really happened (exit codes, output).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.agents.base import Agent, LaunchSpec, Outcome, WorkerContext
from orchestrator.agents.registry import AgentRegistry
from orchestrator.core.address import ApiAddress, settings_address
from orchestrator.core.auth import create_access_token, engine_actor
from orchestrator.core.config import Settings
from orchestrator.core.errors import InvalidTransition
from orchestrator.core.ids import new_engine_id
from orchestrator.core.states import (
    JOB_FINAL,
    JOB_TRANSITIONS,
    WORKER_FINAL,
    WORKER_LIVE,
    WORKER_TRANSITIONS,
    JobStatus,
    WorkerStatus,
)
from orchestrator.db import notify as notifications
from orchestrator.db.events import record_event
from orchestrator.db.models import Job, Worker, WorkerLog, utcnow
from orchestrator.db.session import Database
from orchestrator.db.transitions import (
    Change,
    lock_statuses,
    transition_job,
    transition_many,
    transition_worker,
)
from orchestrator.engine import budget as budgets
from orchestrator.engine import queries
from orchestrator.engine.governor import Governor
from orchestrator.engine.integrate import Integrator
from orchestrator.engine.logs import LogCursor
from orchestrator.engine.queries import JobRow, WorkerRow
from orchestrator.engine.reconcile import Reconciler
from orchestrator.engine.remote_workspace import add_worktree, commit_work, is_remote, resume_worktree
from orchestrator.executors import sandbox as sandboxing
from orchestrator.executors.cgroups import Limits, host_available_mb
from orchestrator.executors.factory import make_executor
from orchestrator.executors.local import (
    EXIT_FILE,
    OUTPUT_FILE,
    PID_FILE,
    STDIN_FILE,
    LocalExecutor,
    WorkerProcess,
    make_dirs,
    pid_alive,
    read_exit_code,
)
from orchestrator.jobs.service import JOBS_TOPIC
from orchestrator.resources import repository as slots_repo
from orchestrator.resources.service import bind_unbound_slot, release_unbound
from orchestrator.workers import repository as workers_repo
from orchestrator.workspaces import git, refs
from orchestrator.workspaces import setup as worktree_setup

log = logging.getLogger("orchestrator.engine")

WORKER_TOKEN_SCOPES = ["jobs:read", "jobs:write", "supervisor:read"]
START_BATCH = 50
IDLE_SLACK = 5  # jobs claimed / IDLE workers read beyond a depth's free slots, for those a pass skips
LOG_INTERVAL_SECONDS = 0.25
RECLAIM_INTERVAL_SECONDS = 2.0
SQLITE_WATCH_SECONDS = 0.05
STOP_STEP_SECONDS = 5.0
LAUNCH_THREADS = max(2, os.cpu_count() or 2)  # the blocking part of a start is short: one per core
WRAPPER_FILES = frozenset({OUTPUT_FILE, EXIT_FILE, PID_FILE, STDIN_FILE})
PIDS_CHECK_SECONDS = 2.0  # how often running workers' process-limit counters are read
LAUNCH_CHUNK = 16  # workers started per launcher-thread call, at least

# A launched worker (process None: it could not start) and what its start records.
Started = tuple[WorkerRow, JobRow, WorkerProcess | None, dict[str, Any]]


def worker_limits(agent: Agent | None, job_limits: dict[str, Any] | None) -> Limits:
    """A worker's cgroup limits: its job's `limits` (checked at submit), else its profile's."""
    asked = job_limits or {}
    if agent is None:
        return Limits(memory_mb=int(asked.get("memory_mb", 1024)), pids=int(asked.get("pids", 512)))
    return Limits(
        memory_mb=int(asked.get("memory_mb", agent.sandbox.memory_mb)),
        pids=int(asked.get("pids", agent.sandbox.pids)),
    )


class Engine:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        agents: AgentRegistry,
        executor: LocalExecutor | None = None,
        address: ApiAddress | None = None,
    ) -> None:
        self.settings = settings
        # Where workers reach the API (the server's own socket; HOST/PORT for a lone engine).
        self.address = address or settings_address(settings)
        self.db = database
        self.agents = agents
        self.executor = executor or make_executor(settings)
        self.id = new_engine_id()
        self.actor = engine_actor(self.id).name
        self.procs: dict[str, WorkerProcess] = {}
        self.cursors: dict[str, LogCursor] = {}
        self.deadlines: dict[str, float] = {}
        self.exited: list[WorkerProcess] = []
        self.unrecorded: list[Started] = []  # launched, to be recorded by the next pass
        self.control_statuses: dict[str, tuple[str, str]] = {}  # read by the pass, for control
        self.wake = asyncio.Event()
        self.log_lock = asyncio.Lock()
        self.repo_locks: dict[str, asyncio.Lock] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.last_reclaim = 0.0
        self.lease = timedelta(seconds=settings.orchestrator_engine_lease_seconds)
        self.runs_dir = settings.data_dir / "runs"
        self.workspaces_dir = settings.data_dir / "workspaces"
        self.governor = Governor(settings)
        self.launcher = ThreadPoolExecutor(max_workers=LAUNCH_THREADS, thread_name_prefix="launch")
        self.spend_changed = False
        self.memory_waits: dict[str, str] = {}
        self.last_pids_check = 0.0  # IDLE workers held by memory-aware admission
        self.last_budget_check = 0.0
        self.integrator = Integrator(self)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        async with self.db.session() as session:
            await queries.register_engine(session, self.id, self.executor.host, os.getpid())
        notifications.add_listener(self._on_notify)
        await self._reclaim(force_same_host=True)
        if self.executor.cgroups is not None and self.executor.cgroups.usable:
            stale = await asyncio.to_thread(self.executor.cgroups.remove_stale, set(self.procs))
            if stale:
                log.info("removed %d stale worker cgroup(s)", len(stale))
        self.tasks = [
            asyncio.create_task(self._run_forever(self._main_loop, "main")),
            asyncio.create_task(self._run_forever(self._heartbeat_loop, "heartbeat")),
            asyncio.create_task(self._run_forever(self._log_loop, "logs")),
        ]
        watcher = self._listen_loop if self.db.is_postgres else self._sqlite_watch_loop
        self.tasks.append(asyncio.create_task(self._run_forever(watcher, "watch")))
        log.info("engine %s started (pid %s, host %s)", self.id, os.getpid(), self.executor.host)

    async def stop(self) -> None:
        """Stop supervising; worker processes keep running and the next engine adopts them."""
        self.stopping = True
        self.wake.set()  # a loop that missed its cancellation still leaves its wait at once
        notifications.remove_listener(self._on_notify)
        for task in self.tasks:
            task.cancel()
        # Bounded: a stop must never hang (workers outlive us, and a peer takes over our jobs).
        _done, pending = await asyncio.wait(self.tasks, timeout=STOP_STEP_SECONDS)
        if pending:
            log.warning("engine %s: %d task(s) did not stop in time: %s", self.id, len(pending), pending)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.integrator.stop(), STOP_STEP_SECONDS)
        if self.unrecorded:  # else the next engine finds them by their PID files ("adopted")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._record_starts_now(self.unrecorded), STOP_STEP_SECONDS)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ingest_all(), STOP_STEP_SECONDS)
        for proc in self.procs.values():
            self.executor.unwatch(proc)  # the process outlives us by design; the next engine adopts it
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._unregister(), STOP_STEP_SECONDS)
        self.launcher.shutdown(wait=False)

    async def _unregister(self) -> None:
        async with self.db.session() as session:
            await queries.unregister_engine(session, self.id)

    def _on_notify(self, _topics: set[str]) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.wake.set()
        else:
            self.loop.call_soon_threadsafe(self.wake.set)

    async def _run_forever(self, body: Any, name: str) -> None:
        while not self.stopping:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("engine %s: %s loop failed; retrying", self.id, name)
                await asyncio.sleep(0.5)

    async def _main_loop(self) -> None:
        while not self.stopping:
            self.wake.clear()
            await self.tick()
            if self.stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.settings.orchestrator_poll_seconds)

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.orchestrator_engine_lease_seconds / 3
        while not self.stopping:
            await asyncio.sleep(interval)
            async with self.db.session() as session:
                alive = await queries.heartbeat(session, self.id)
                if not alive:
                    log.warning("engine %s was declared dead by a peer; registering again", self.id)
                    await queries.register_engine(session, self.id, self.executor.host, os.getpid())

    async def _log_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(LOG_INTERVAL_SECONDS)
            await self._ingest_all()

    async def _listen_loop(self) -> None:
        """PostgreSQL LISTEN: wake on commits made by any process."""
        import asyncpg

        dsn = self.settings.async_database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.add_listener(notifications.CHANNEL, lambda *_: self.wake.set())
            while not self.stopping:
                await asyncio.sleep(5)
                await conn.execute("SELECT 1")
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _sqlite_watch_loop(self) -> None:
        """SQLite has no NOTIFY: wake when another connection commits (`PRAGMA data_version`
        changes), which costs a shared-memory read every 50 ms instead of a full pass."""
        import sqlite3

        path = self.db.engine.url.database
        if not path or path == ":memory:":
            return
        conn = sqlite3.connect(path, timeout=5, check_same_thread=False)
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            while not self.stopping:
                await asyncio.sleep(SQLITE_WATCH_SECONDS)
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != last:
                    last = current
                    self.wake.set()
        finally:
            conn.close()

    # ---------------------------------------------------------------- one pass

    async def tick(self) -> None:
        """One pass: one transaction (record the previous pass's starts and this pass's exits,
        settle jobs, claim, give slots), then control, then launch. Starts are recorded by the
        next pass, which comes at once: at full load every pass has slots to refill, and a second
        commit per pass cost more than the rest of recording them."""
        batch, self.exited = self.exited, []
        starts, self.unrecorded = self.unrecorded, []
        try:
            if starts and any(p.extra.get("repository") for p in batch):
                # A worktree is committed before its exit is recorded, from the branch its
                # recorded start names: record the starts first (rare: git work takes a while).
                await self._record_starts_now(starts)
                starts = []
            outcomes = await self._collect_exits(batch)
            ready = await self._schedule(starts, outcomes)
        except BaseException:
            # Not recorded: the next pass tries again.
            self.exited = batch + self.exited
            self.unrecorded = starts + self.unrecorded
            raise
        self._forget(batch)
        self.integrator.launch()
        if time.monotonic() - self.last_reclaim > RECLAIM_INTERVAL_SECONDS:
            await self._reclaim()
        await self._apply_control()
        await self._resume_parked()
        await self._enforce_budgets()
        if ready:
            started = await self._launch_all(ready)
            for _, job, proc, _ in started:
                if proc is not None:
                    self._supervise(proc, job, offset=0, lines=0)
            self.unrecorded.extend(started)
            self.wake.set()  # the next pass records them, even if nothing else happens

    async def _record_starts_now(self, starts: list[Started]) -> None:
        async with self.db.session() as session:
            await self._record_starts(session, starts)
            await notifications.notify(session, JOBS_TOPIC)

    async def _schedule(
        self, starts: list[Started], exits: list[tuple[WorkerProcess, dict[str, Any]]]
    ) -> list[tuple[WorkerRow, JobRow]]:
        """Record the workers started and ended since the last pass (the slots of the ended come
        back), settle their jobs, then claim PENDING jobs, create their workers, and give IDLE
        workers slots: one transaction."""
        async with self.db.session() as session:
            running = await self._record_starts(session, starts) if starts else {}
            if exits:
                await self._record_exits(session, exits, running)
            await self._settle_jobs(session)
            if starts or exits:
                await notifications.notify(session, JOBS_TOPIC)
            free = await slots_repo.pools_free(session, None)
            per_depth = {
                depth: min(count, START_BATCH) + IDLE_SLACK for depth, count in free.items() if count > 0
            }
            backlog = await queries.owned_pending_by_depth(session, self.id)
            room = {depth: count - backlog.get(depth, 0) for depth, count in per_depth.items()}
            # Only jobs nobody owned are claimed, and workers are made only here: none has any yet.
            claimed = await queries.claim_pending(session, self.id, room)
            await queries.create_workers(session, claimed, self.actor)
            idle = await queries.idle_workers(session, self.id, per_depth, START_BATCH * 4)
            ready = await self._bind_slots(session, idle, free) if idle and self.executor.can_start() else []
            # What control (after this transaction) acts on: read here, not in one more.
            self.control_statuses = await queries.worker_statuses(session, list(self.procs))
        if len(ready) == START_BATCH:
            self.wake.set()  # more to do: come straight back
        return ready

    async def _bind_slots(
        self, session: AsyncSession, idle: list[tuple[WorkerRow, JobRow]], free: dict[int, int]
    ) -> list[tuple[WorkerRow, JobRow]]:
        """Give slots to IDLE workers in queue order, at most START_BATCH: a slot they hold
        already, else an unbound one of their job (an explicit allocation), else a new one from
        their depth's pool. The counters are read under lock, so the new slots of the whole pass
        are taken with one UPDATE per job and one per depth."""
        limited = await self._rate_limited_agents(session, {job.agent for _, job in idle})
        room = await slots_repo.allocations_room(session, list({job.id for _, job in idle}))
        if self.db.is_postgres:  # read again, now locked, after the allocations (lock order)
            free = await slots_repo.pools_free(session, sorted({job.depth for _, job in idle}), lock=True)
        ready: list[tuple[WorkerRow, JobRow]] = []
        new_slots: dict[int, tuple[dict[str, int], list[str]]] = {}
        memory = self._memory_room()
        waiting: dict[str, str] = {}
        for worker, job in idle:
            if len(ready) >= START_BATCH:
                break
            if worker.id in self.procs or job.agent in limited:
                continue
            if memory is not None:
                agent = self.agents.agents.get(job.agent)
                needs = worker_limits(agent, job.limits).memory_mb if agent is not None else 0
                if needs + self.settings.orchestrator_memory_headroom_mb > memory:
                    waiting[worker.id] = f"waiting for memory: needs {needs} MiB, {max(memory, 0)} available"
                    continue
                memory -= needs
            if worker.holds_slot:
                ready.append((worker, job))
                continue
            unbound, more = room.get(job.id, (0, 0))
            if unbound > 0:
                if await bind_unbound_slot(session, worker.id, job.id):
                    ready.append((worker, job))
                    room[job.id] = (unbound - 1, more)
                continue
            if more > 0 and free.get(job.depth, 0) > 0:
                per_job, worker_ids = new_slots.setdefault(job.depth, ({}, []))
                per_job[job.id] = per_job.get(job.id, 0) + 1
                worker_ids.append(worker.id)
                room[job.id] = (0, more - 1)
                free[job.depth] -= 1
                ready.append((worker, job))
        for depth, (per_job, worker_ids) in sorted(new_slots.items()):
            await slots_repo.bind_new_slots(session, depth, per_job, worker_ids)
        await self._note_memory_waits(session, waiting)
        return ready

    def _memory_room(self) -> int | None:
        """MiB a new worker may still reserve: the host's available memory minus the limits of
        the workers running (or just launched), which may grow to them; None without limits."""
        if self.executor.cgroups is None:
            return None
        available = host_available_mb(self.settings.orchestrator_meminfo_path)
        if available is None:
            return None
        procs = [*self.procs.values(), *(p for _, _, p, _ in self.unrecorded if p is not None)]
        reserved = sum(cast(int, p.extra.get("memory_mb", 0)) for p in procs if not p.exited)
        return available - reserved

    async def _note_memory_waits(self, session: AsyncSession, waiting: dict[str, str]) -> None:
        """Say why IDLE workers wait for memory (once per change of the reason)."""
        for worker_id, reason in waiting.items():
            if self.memory_waits.get(worker_id) != reason:
                await session.execute(
                    update(Worker)
                    .where(Worker.id == worker_id, Worker.status == WorkerStatus.IDLE.value)
                    .values(status_reason=reason)
                )
        self.memory_waits = waiting

    async def _launch_all(self, ready: list[tuple[WorkerRow, JobRow]]) -> list[Started]:
        """Start the pass's workers: each is prepared in the event loop (a worktree, if any, in a
        thread), then the blocking part (directories, files, the spawn) runs in the launcher
        threads, a chunk of workers per call: per-worker thread hand-offs cost more than the
        spawns on 2 cores, but a slow disk makes each directory cost up to a millisecond, so a
        big pass is still split across the threads."""
        prepared: list[tuple[WorkerRow, JobRow, dict[str, Any], Callable[[], WorkerProcess]]] = []
        started: list[Started] = []
        for worker, job in ready:
            try:
                values, start = await self._prepare_launch(worker, job)
                prepared.append((worker, job, values, start))
            except Exception as exc:
                started.append(self._not_started(worker, job, exc))
        size = max(LAUNCH_CHUNK, -(-len(prepared) // LAUNCH_THREADS))
        chunks = [prepared[i : i + size] for i in range(0, len(prepared), size)]
        loop = asyncio.get_running_loop()
        for chunk_result in await asyncio.gather(
            *(loop.run_in_executor(self.launcher, self._start_chunk, chunk) for chunk in chunks)
        ):
            started.extend(chunk_result)
        return started

    def _start_chunk(
        self, chunk: list[tuple[WorkerRow, JobRow, dict[str, Any], Callable[[], WorkerProcess]]]
    ) -> list[Started]:
        """Runs in a launcher thread: one worker that cannot start does not stop the others."""
        started: list[Started] = []
        for worker, job, values, start in chunk:
            try:
                started.append((worker, job, start(), values))
            except Exception as exc:
                started.append(self._not_started(worker, job, exc))
        for _, _, proc, _ in started:
            if proc is not None:
                self.executor.read_start_time(proc)  # the execs ran meanwhile: no wait for each
        return started

    @staticmethod
    def _not_started(worker: WorkerRow, job: JobRow, exc: Exception) -> Started:
        """A worker that could not start: the next pass records it FAILED with the reason."""
        log.warning("worker %s could not start: %s", worker.id, exc)
        return worker, job, None, {"status_reason": f"could not start: {exc}"}

    async def _prepare_launch(
        self, worker: WorkerRow, job: JobRow
    ) -> tuple[dict[str, Any], Callable[[], WorkerProcess]]:
        """What a worker's start records, and the blocking call that starts it."""
        agent = self.agents.get(job.agent)
        run_dir = self.runs_dir / worker.id
        workdir = self.workspaces_dir / worker.id
        values: dict[str, Any] = {"run_dir": str(run_dir), "workdir": str(workdir)}
        if job.repository:
            branch = git.branch_name(job.id, worker.id)
            async with self._repo_lock(job.repository):
                repository = await self._checked_repository(job.repository)
                base = await self._start_point(repository, job)
                await asyncio.to_thread(
                    add_worktree, self.executor, self.settings, repository, workdir, branch, base
                )
            values.update(branch=branch, result={"base_commit": base})
        context = self._worker_context(worker, job, workdir, run_dir / "home", run_dir)

        def start() -> WorkerProcess:
            # Before the agent writes its files there; a remote node makes its own worktree.
            make_dirs(run_dir, context.home, *([] if is_remote(self.executor) else [workdir]))
            spec = worktree_setup.prepare(
                self.settings.orchestrator_agents_file,
                job.repository,
                workdir,
                run_dir,
                agent.launch(context),
            )
            proc = self._start_process(worker.id, agent, spec, context, job.limits, read_start_time=False)
            values["started_at"] = utcnow()  # recorded by the next pass: keep the real time
            return proc

        return values, start

    def _start_process(
        self,
        worker_id: str,
        agent: Agent,
        spec: LaunchSpec,
        context: WorkerContext,
        job_limits: dict[str, Any] | None,
        *,
        read_start_time: bool = True,
    ) -> WorkerProcess:
        """Start a worker in its sandbox (docs/SANDBOX.md) with its profile's limits: the view
        is its worktree, its HOME (both handed to the agent's uid), the profile's binds and the
        programs the agent needs."""
        profile = agent.sandbox
        box = sandboxing.SandboxSpec(
            context.workdir,
            context.home,
            network=profile.network and (job_limits or {}).get("network") != "none",
            ro_binds=[*agent.sandbox_paths(), *profile.ro_binds],
            rw_binds=list(profile.rw_binds),
        )
        # Files the agent profile wrote into the run dir for the agent (an MCP config, say):
        # read-only in the sandbox, at the paths its command line names. The wrapper's own files
        # (output, exit status, PID) stay out of reach.
        for entry in os.scandir(context.run_dir):
            if entry.is_file(follow_symlinks=False) and entry.name not in WRAPPER_FILES:
                box.ro_files.append((entry.path, entry.path))
                if self.executor.sandbox is not None and self.executor.sandbox.uid is not None:
                    os.chown(entry.path, self.executor.sandbox.uid, self.executor.sandbox.uid)
        if context.api_socket and os.path.exists(context.api_socket):
            # `uvicorn --uds`: the worker reaches the API through the server's unix socket (uvicorn
            # makes it 0666), bound in at its own path; a path socket is reachable whatever the
            # network namespace, so also with network "none".
            box.rw_extra.append(context.api_socket)
        dirs = git.worktree_git_dirs(context.workdir)
        if dirs is not None and self.executor.sandbox is not None:
            # Git in the sandbox: the repository's common dir read-only (refs, objects and config
            # of every other branch stay as they are), the worktree's own dir (HEAD, index)
            # writable, new objects in a private store beside the shared one. The engine
            # commits the worktree onto the worker's branch when it ends.
            # A private copy of the common dir (refs, HEAD, config) is mounted over it, so the
            # agent's own commits and branches work on refs only it sees; the shared objects
            # are mounted read-only inside it. The engine commits the worktree's final state
            # onto the worker's branch when it ends (the agent's own commit history stays in
            # its private view).
            own, common = dirs
            objects = context.home / ".git-objects"
            private = context.run_dir / "git-common"
            make_dirs(objects)
            sandboxing.private_git_common(common, own, private)
            box.mounts += [
                (str(private), str(common), True),
                (str(common / "objects"), str(common / "objects"), False),
                (str(own), str(common / "worktrees" / own.name), True),
            ]
            spec.env["GIT_OBJECT_DIRECTORY"] = str(objects)
            spec.env["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = str(common / "objects")
            if self.executor.sandbox.uid is not None:
                sandboxing.give_to_agent(self.executor.sandbox, own, private)
        if self.executor.sandbox is not None and self.executor.sandbox.usable:
            sandboxing.give_to_agent(self.executor.sandbox, context.home, context.workdir)
        limits = worker_limits(agent, job_limits)
        proc = self.executor.start(
            worker_id,
            spec,
            context.workdir,
            context.run_dir,
            read_start_time=read_start_time,
            sandbox=box,
            limits=limits,
        )
        proc.extra["memory_mb"] = limits.memory_mb  # reserved while it runs (memory-aware admission)
        return proc

    def _worker_context(
        self,
        worker: WorkerRow,
        job: JobRow,
        workdir: Path,
        home: Path,
        run_dir: Path,
        resume_session: str | None = None,
    ) -> WorkerContext:
        expires = timedelta(seconds=job.timeout_seconds + 3600) if job.timeout_seconds else timedelta(days=7)
        token = create_access_token(
            user_id=job.created_by,
            scopes=WORKER_TOKEN_SCOPES,
            expires_delta=expires,
            worker_id=worker.id,
            job_id=job.id,
        )
        return WorkerContext(
            job_id=job.id,
            worker_id=worker.id,
            worker_index=worker.worker_index,
            worker_count=job.worker_count,
            depth=job.depth,
            task=job.task_description,
            options=job.agent_options or {},
            workdir=workdir,
            home=home,
            run_dir=run_dir,
            api_url=self.address.url,
            api_socket=self.address.socket_path,
            token=token,
            max_turns=job.max_turns,
            resume_session=resume_session,
        )

    # ---------------------------------------------------------------- rate limits and budgets

    async def _rate_limited_agents(self, session: AsyncSession, names: set[str]) -> set[str]:
        """Agents whose provider account is in a rate-limit backoff: their new workers wait."""
        accounts: dict[str, str] = {}
        for name in names:
            agent = self.agents.agents.get(name)
            key = agent.account_key() if agent is not None else None
            if key is not None:
                accounts[name] = key
        blocked = await self.governor.blocked(session, set(accounts.values()))
        return {name for name, key in accounts.items() if key in blocked}

    def _outcome(self, worker: WorkerRow, values: dict[str, Any], exit_code: int | None) -> Outcome | None:
        agent = self.agents.agents.get(worker.agent)
        if agent is None:
            return None
        failed = worktree_setup.failure(self.runs_dir / worker.id)
        if failed is not None:
            return Outcome(False, failed)
        result = values.get("result")
        return agent.outcome(result if isinstance(result, dict) else None, exit_code)

    async def _park(
        self, session: AsyncSession, worker: WorkerRow, values: dict[str, Any], outcome: Outcome
    ) -> bool:
        """A rate-limited run: keep the worker RUNNING (and its slot) and resume it after a backoff."""
        agent = self.agents.agents.get(worker.agent)
        account = agent.account_key() if agent is not None else None
        if account is None or worker.status != WorkerStatus.RUNNING:
            return False
        delay = await self.governor.park(session, worker, values, outcome, account, self.actor)
        if delay is None:
            return False
        if self.loop is not None:
            self.loop.call_later(delay + 0.01, self.wake.set)
        return True

    async def _resume_parked(self) -> None:
        """Restart due parked workers in place: same worker, worktree, run dir and log; new process."""
        due = self.governor.due()
        if not due:
            return
        async with self.db.session() as session:
            workers = {
                w.id: w for w in await queries.workers_for_jobs(session, list({p.job_id for p in due}))
            }
            jobs = await queries.jobs_by_id(session, list({p.job_id for p in due}))
            limited = await self.governor.blocked(session, {p.account for p in due})
            for parked in due:
                worker, job = workers.get(parked.worker_id), jobs.get(parked.job_id)
                if worker is None or job is None or worker.status in WORKER_FINAL:
                    self.governor.parked.pop(parked.worker_id, None)
                    if worker is not None and worker.holds_slot:
                        await slots_repo.worker_release_slot(session, worker.id, worker.job_id, worker.depth)
                    continue
                if worker.status != WorkerStatus.RUNNING or parked.account in limited:
                    continue  # paused by an operator, or the account is still in backoff
                self.governor.parked.pop(parked.worker_id, None)
                run_dir = Path(worker.run_dir or self.runs_dir / worker.id)
                workdir = Path(worker.workdir or self.workspaces_dir / worker.id)
                result = dict(worker.result or {})
                for key in ("waiting", "retry_at", "waiting_reason"):
                    result.pop(key, None)
                result["resumes"] = int(result.get("resumes", 0)) + 1
                try:
                    agent = self.agents.get(job.agent)
                    context = self._worker_context(
                        worker, job, workdir, run_dir / "home", run_dir, parked.session_id
                    )
                    spec = agent.launch(context)
                    (run_dir / "exit").unlink(missing_ok=True)
                    await asyncio.to_thread(
                        resume_worktree, self.executor, self.settings, job.repository, workdir, worker.branch
                    )
                    proc = self._start_process(worker.id, agent, spec, context, job.limits)
                except Exception as exc:
                    log.warning("worker %s could not be resumed: %s", worker.id, exc)
                    reason = f"could not resume after a rate limit: {exc}"
                    await self._fail(session, worker, reason, values={"result": result})
                    continue
                await session.execute(
                    update(Worker)
                    .where(Worker.id == worker.id)
                    .values(
                        pid=proc.pid,
                        pid_start_time=proc.start_time,
                        engine_id=self.id,
                        host=self.executor.host,
                        result=result,
                        exit_code=None,
                        status_reason=f"resumed after a rate limit (resume {result['resumes']})",
                        updated_at=utcnow(),
                    )
                )
                record_event(
                    session,
                    job_id=job.id,
                    worker_id=worker.id,
                    kind="worker.resumed",
                    actor=self.actor,
                    reason="rate-limit backoff over",
                    data={"pid": proc.pid, "session_id": parked.session_id, "resumes": result["resumes"]},
                    created_at=utcnow(),
                )
                self._supervise(proc, job, offset=worker.log_offset, lines=worker.log_lines)
            await notifications.notify(session, JOBS_TOPIC)
        if self.governor.parked and self.loop is not None:
            self.loop.call_later(max(0.2, self.governor.next_due_in() or 0.0), self.wake.set)

    async def _enforce_budgets(self) -> None:
        now = time.monotonic()
        if not self.spend_changed and now - self.last_budget_check < RECLAIM_INTERVAL_SECONDS:
            return
        self.spend_changed = False
        self.last_budget_check = now
        async with self.db.session() as session:
            finishing = frozenset(w for w, p in self.procs.items() if "agent_result" in p.extra)
            if await budgets.enforce(session, self.id, engine_actor(self.id), finishing):
                await notifications.notify(session, "control")

    async def _checked_repository(self, recorded: str) -> Path:
        """The job's repository, checked as at the submit (roots, real git dirs, top level): its
        files may have changed since (a `.git` file or a symlink swapped in)."""
        repository = await asyncio.to_thread(git.resolve_repository, self.settings, recorded)
        if repository != Path(recorded):
            raise git.GitError(f"repository {recorded} now resolves to {repository}")
        return repository

    async def _start_point(self, repository: Path, job: JobRow) -> str:
        """The commit a worker starts from: base_ref (else HEAD) with the submit's checks repeated
        on what it resolves to now. Only the delegating worker's own branch is checkpointed (its
        live worktree committed first, so the child sees its work so far); no other worktree."""
        if not job.base_ref:
            return (await asyncio.to_thread(refs.resolve, repository, "HEAD")).commit
        by_worker = job.created_by_worker_id
        subtree = job.path.removesuffix(f"{job.id}/") if by_worker else None
        resolved = await refs.resolve_checked(
            repository, job.base_ref, subtree=subtree, path_of=self._job_path
        )
        own = git.branch_name(job.parent_job_id or "", by_worker or "")
        if by_worker and job.parent_job_id and refs.is_branch(resolved, own):
            worktree = self.workspaces_dir / by_worker
            if (worktree / ".git").exists():
                # On the worker's own branch (HEAD put back on it, the index rebuilt): a sandboxed
                # agent may have pointed HEAD at another branch or staged objects only its
                # private object store holds.
                await asyncio.to_thread(
                    git.commit_all, worktree, "orchestrator: checkpoint before delegating", None, own
                )
            resolved = await asyncio.to_thread(refs.resolve, repository, resolved.full_name)
        return resolved.commit

    async def _job_path(self, job_id: str) -> str | None:
        async with self.db.session() as session:
            job = await session.get(Job, job_id)
            return job.path if job is not None else None

    async def _record_starts(self, session: AsyncSession, started: list[Started]) -> dict[str, WorkerRow]:
        """Record a pass's started workers (and their jobs' first start) in a few statements; the
        processes are supervised already (their exits may be recorded in the same transaction).
        Returns the workers now RUNNING, as written (their rows stay locked until the commit)."""
        launched = [item for item in started if item[2] is not None]
        statuses = await lock_statuses(session, Worker, [worker.id for worker, _, _, _ in launched])
        changes: list[Change] = []
        for worker, _, proc, values in started:
            if proc is None:
                await self._fail(session, worker, values["status_reason"])
                continue
            values.update(
                pid=proc.pid,
                pid_start_time=proc.start_time,
                host=proc.host or self.executor.host,
                engine_id=self.id,
            )
            if statuses.get(worker.id) == worker.status and WorkerStatus.RUNNING in WORKER_TRANSITIONS.get(
                WorkerStatus(worker.status), frozenset()
            ):
                changes.append(Change(worker, WorkerStatus.RUNNING, "started", values, model=Worker))
            else:
                # Terminated while we were starting it: record the process, then stop it.
                await session.execute(update(Worker).where(Worker.id == worker.id).values(**values))
        await transition_many(session, changes, actor=self.actor)
        first: dict[str, tuple[JobRow, datetime]] = {}
        for _, job, _, values in launched:
            if job.status == JobStatus.PENDING.value:
                earliest = first.get(job.id, (job, values["started_at"]))[1]
                first[job.id] = (job, min(earliest, values["started_at"]))
        job_statuses = await lock_statuses(session, Job, list(first))
        await transition_many(
            session,
            [
                Change(job, JobStatus.RUNNING, "first worker started", {"started_at": started_at}, model=Job)
                for job, started_at in first.values()
                if job_statuses.get(job.id) == JobStatus.PENDING.value
            ],
            actor=self.actor,
        )
        return {change.known.id: cast(WorkerRow, change.known) for change in changes}

    def _supervise(self, proc: WorkerProcess, job: JobRow, *, offset: int, lines: int) -> None:
        self.procs[proc.worker_id] = proc
        if "memory_mb" not in proc.extra and not proc.exited:  # adopted: its cgroup says
            agent = self.agents.agents.get(job.agent)
            memory = self.executor.memory_limit_mb(proc.worker_id)
            proc.extra["memory_mb"] = memory or (worker_limits(agent, job.limits).memory_mb if agent else 0)
        self.cursors[proc.worker_id] = LogCursor(proc.output_path, offset=offset, lines=lines)
        proc.extra["agent"] = job.agent
        proc.extra["job_id"] = job.id
        proc.extra["depth"] = job.depth
        proc.extra["repository"] = bool(job.repository)
        if job.timeout_seconds:
            self.deadlines[proc.worker_id] = time.monotonic() + job.timeout_seconds
            if self.loop is not None:
                self.loop.call_later(job.timeout_seconds, self.wake.set)
        self.executor.watch(proc, self._on_exit)

    def _on_exit(self, proc: WorkerProcess) -> None:
        self.exited.append(proc)
        self.wake.set()

    def _repo_lock(self, repository: str) -> asyncio.Lock:
        return self.repo_locks.setdefault(repository, asyncio.Lock())

    # ---------------------------------------------------------------- control

    async def _apply_control(self) -> None:
        """Make processes follow the statuses the pass's transaction read; a worker to stop is
        written in a transaction of its own (rare)."""
        both, self.control_statuses = self.control_statuses, {}
        if not self.procs:
            return
        now = time.monotonic()
        statuses = {worker_id: status for worker_id, (status, _) in both.items()}
        orphans = [
            (worker_id, job_status)
            for worker_id, (worker_status, job_status) in both.items()
            if worker_status in WORKER_LIVE and JobStatus(job_status) in JOB_FINAL
        ]
        overdue = [
            worker_id
            for worker_id, deadline in self.deadlines.items()
            if now >= deadline and statuses.get(worker_id) in (WorkerStatus.RUNNING, WorkerStatus.PAUSED)
        ]
        bombs = self._at_process_limit(now, statuses)
        if orphans or overdue or bombs:
            async with self.db.session() as session:
                for worker_id, reason in bombs.items():
                    # A fork bomb is held at its limit; the worker is stopped, not left spinning.
                    await self._mark_stopped(session, statuses, worker_id, WorkerStatus.FAILED, reason)
                for worker_id, job_status in orphans:
                    # Its job ended while it was being started (a cancel that committed between
                    # this engine's claim and the start): a worker never outlives its job.
                    await self._mark_stopped(
                        session, statuses, worker_id, WorkerStatus.TERMINATED, f"its job is {job_status}"
                    )
                for worker_id in overdue:
                    await self._mark_stopped(session, statuses, worker_id, WorkerStatus.FAILED, "timeout")
                    self.deadlines.pop(worker_id, None)
        grace = self.settings.orchestrator_terminate_grace_seconds
        for worker_id, proc in list(self.procs.items()):
            if proc.exited:
                continue
            status = statuses.get(worker_id)
            if status == WorkerStatus.PAUSED and not proc.applied_paused:
                if self.executor.send(proc, signal.SIGSTOP):
                    proc.applied_paused = True
            elif status == WorkerStatus.RUNNING and proc.applied_paused:
                self.executor.send(proc, signal.SIGCONT)
                proc.applied_paused = False
            elif status is not None and status in WORKER_FINAL:
                if proc.stop_signal_sent_at is None:
                    self.executor.send(proc, signal.SIGTERM)
                    self.executor.send(proc, signal.SIGCONT)
                    proc.stop_signal_sent_at = now
                elif not proc.kill_sent and now - proc.stop_signal_sent_at >= grace:
                    self.executor.send(proc, signal.SIGKILL)
                    proc.kill_sent = True
        if any(p.stop_signal_sent_at is not None and not p.kill_sent for p in self.procs.values()):
            # Come back for the SIGKILL deadline even if nothing else happens.
            assert self.loop is not None
            self.loop.call_later(min(grace, 0.5) or 0.1, self.wake.set)

    def _at_process_limit(self, now: float, statuses: dict[str, str]) -> dict[str, str]:
        """Running workers that hit their process limit (checked every PIDS_CHECK_SECONDS)."""
        groups = self.executor.cgroups
        if groups is None or not groups.usable or now - self.last_pids_check < PIDS_CHECK_SECONDS:
            return {}
        self.last_pids_check = now
        found: dict[str, str] = {}
        for worker_id, proc in self.procs.items():
            if proc.exited or statuses.get(worker_id) != WorkerStatus.RUNNING:
                continue
            with contextlib.suppress(OSError, KeyError):
                if groups.limit_hit(worker_id)[1]:
                    limit = groups.limit_of(worker_id)[1]
                    reason = f"process limit: it reached its limit of {limit} processes (fork bomb contained)"
                    found[worker_id] = reason
        return found

    async def _mark_stopped(
        self,
        session: AsyncSession,
        statuses: dict[str, str],
        worker_id: str,
        target: WorkerStatus,
        reason: str,
    ) -> None:
        """Stop a worker in the database (the signals follow from its new status); one that ended
        meanwhile keeps the status it ended with."""
        with contextlib.suppress(InvalidTransition):
            await transition_worker(
                session,
                worker_id,
                target,
                actor=self.actor,
                reason=reason,
                values={"stop_requested_at": utcnow()},
            )
            statuses[worker_id] = target.value

    # ---------------------------------------------------------------- endings

    async def _collect_exits(self, batch: list[WorkerProcess]) -> list[tuple[WorkerProcess, dict[str, Any]]]:
        """The last output and the outcome of each ended worker, gathered outside the write
        transaction that records them (a worktree is committed first)."""
        if not batch:
            return []
        for proc in batch:
            await self._ingest(proc.worker_id, final=True)
        # Workers in a repository need their row before the write transaction (their worktree is
        # committed first, outside it); the others are read once, in it.
        in_repository = [p.worker_id for p in batch if p.extra.get("repository") is not False]
        workers: dict[str, Worker] = {}
        if in_repository:
            async with self.db.read_session() as session:
                workers = await queries.workers_by_id(session, in_repository)
        return [(proc, await self._collect_outcome(proc, workers.get(proc.worker_id))) for proc in batch]

    def _forget(self, batch: list[WorkerProcess]) -> None:
        for proc in batch:
            self.procs.pop(proc.worker_id, None)
            self.cursors.pop(proc.worker_id, None)
            self.deadlines.pop(proc.worker_id, None)

    async def _collect_outcome(self, proc: WorkerProcess, worker: Worker | None) -> dict[str, Any]:
        """The exit status, the worktree committed (if any), and what to add to the result."""
        patch: dict[str, Any] = {}
        values: dict[str, Any] = {"_exit": read_exit_code(proc.run_dir), "_result_patch": patch}
        values["_limit"] = await asyncio.to_thread(self.executor.ending, proc.worker_id)
        agent_result = proc.extra.get("agent_result")
        if isinstance(agent_result, dict):
            patch.update(agent_result)
        if isinstance(proc.extra.get("agent_api_retry"), dict):
            patch["api_retry"] = proc.extra["agent_api_retry"]
        if worker is not None and worker.branch and worker.workdir:
            job_repo = None
            async with self.db.read_session() as session:
                job = await session.get(Job, worker.job_id)
                job_repo = job.repository if job else None
            try:
                async with self._repo_lock(job_repo or ""):
                    commit, stat = await asyncio.to_thread(
                        commit_work,
                        self.executor,
                        self.settings,
                        job_repo,
                        Path(worker.workdir),
                        f"orchestrator: work of {worker.id} (job {worker.job_id})",
                        (worker.result or {}).get("base_commit"),
                        worker.branch,
                    )
                values.update(commit=commit, diff_stat=stat)
            except (git.GitError, OSError) as exc:
                patch["commit_error"] = str(exc)
        return values

    async def _record_exits(
        self,
        session: AsyncSession,
        outcomes: list[tuple[WorkerProcess, dict[str, Any]]],
        running: dict[str, WorkerRow],
    ) -> None:
        """Record how a pass's workers ended and return their slots: a few statements for all.
        `running`: workers whose start this transaction recorded, so their rows are known."""
        unknown = [proc.worker_id for proc, _ in outcomes if proc.worker_id not in running]
        fresh: dict[str, WorkerRow] = {**running, **await queries.workers_by_id(session, unknown, lock=True)}
        changes: list[Change] = []
        plain: list[tuple[str, dict[str, Any]]] = []
        release: list[tuple[str, str, int]] = []
        for proc, values in outcomes:
            exit_code = values.pop("_exit")
            patch = values.pop("_result_patch")
            limit = values.pop("_limit", None)
            values["exit_code"] = exit_code
            current = fresh.get(proc.worker_id)
            if current is None:
                continue
            values["result"] = {**(current.result or {}), **patch} or None
            outcome = self._outcome(current, values, exit_code) if current.status in WORKER_LIVE else None
            if limit is not None:
                outcome = Outcome(False, limit)  # a limit killed it: that is the reason, not the agent's
            if outcome is not None and outcome.retryable and not proc.kill_sent:
                if await self._park(session, current, values, outcome):
                    continue  # keeps its slot; the engine resumes it after the backoff
                outcome = Outcome(False, f"{outcome.reason} (gave up after rate-limit resumes)")
            if outcome is not None and outcome.ok:
                agent = self.agents.agents.get(current.agent)
                account = agent.account_key() if agent is not None else None
                if account is not None:
                    await self.governor.note_ok(session, account)
            if current.status in WORKER_LIVE:
                target, reason = self._ending(outcome, exit_code)
                changes.append(Change(current, target, reason, values, model=Worker))
            else:
                plain.append((current.id, values))
            release.append((current.id, current.job_id, current.depth))
        await transition_many(session, changes, actor=self.actor)
        for worker_id, values in plain:
            await session.execute(update(Worker).where(Worker.id == worker_id).values(**values))
        await slots_repo.workers_release_slots(session, release)

    @staticmethod
    def _ending(outcome: Outcome | None, exit_code: int | None) -> tuple[WorkerStatus, str]:
        if outcome is not None:
            return (WorkerStatus.COMPLETED if outcome.ok else WorkerStatus.FAILED), outcome.reason
        if exit_code == 0:
            return WorkerStatus.COMPLETED, "exit code 0"
        if exit_code is None:
            return WorkerStatus.FAILED, "killed: the worker ended without an exit status"
        if exit_code > 128:
            return WorkerStatus.FAILED, f"exit code {exit_code} (signal {exit_code - 128})"
        return WorkerStatus.FAILED, f"exit code {exit_code}"

    async def _fail(
        self, session: AsyncSession, worker: WorkerRow, reason: str, values: dict[str, Any] | None = None
    ) -> None:
        """FAILED with `reason` (unless it has ended already), and its slot back."""
        if worker.status in WORKER_LIVE:
            with contextlib.suppress(InvalidTransition):
                await transition_worker(
                    session, worker.id, WorkerStatus.FAILED, actor=self.actor, reason=reason, values=values
                )
        await slots_repo.worker_release_slot(session, worker.id, worker.job_id, worker.depth)

    async def _settle_jobs(self, session: AsyncSession) -> None:
        """Decide the outcome of jobs whose workers have all ended and whose children are final."""
        candidates = await queries.jobs_without_live_workers(session, self.id)
        if not candidates:
            return
        ids = [job.id for job in candidates]
        # Three reads for all candidates, not three per job.
        children_of = await queries.children_statuses(session, ids)
        workers_of = await queries.worker_endings(session, ids)
        unbound = await queries.unbound_slots(session, ids)
        endings: list[Change] = []
        ending: list[queries.SettlingJob] = []
        for job in candidates:
            children = children_of.get(job.id, [])
            if any(
                status not in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)
                for _, status in children
            ):
                continue
            workers = workers_of.get(job.id, [])
            if any(w.holds_slot for w in workers):
                continue  # an exit is still being recorded
            bad = [w for w in workers if w.status != WorkerStatus.COMPLETED]
            bad_children = [(cid, status) for cid, status in children if status != JobStatus.COMPLETED]
            if bad:
                first = bad[0]
                reason = f"worker {first.id} {first.status}: {first.status_reason or 'no reason recorded'}"
                if len(bad) > 1:
                    reason += f" (and {len(bad) - 1} more)"
                target = JobStatus.FAILED
            elif bad_children:
                reason = f"child job {bad_children[0][0]} {bad_children[0][1]}"
                target = JobStatus.FAILED
            else:
                target, reason = JobStatus.COMPLETED, "all workers and child jobs completed"
            if target in JOB_TRANSITIONS[JobStatus(job.status)]:
                endings.append(Change(job, target, reason, model=Job))
                ending.append(job)
        # A job with a repository COMPLETES once its result branch is written (engine/integrate.py).
        gated = await self.integrator.gate(session, {c.known.id: JobStatus(c.target) for c in endings})
        for index in reversed(range(len(endings))):
            if endings[index].known.id in gated:
                decided = gated[endings[index].known.id]
                if decided is None:
                    del endings[index], ending[index]
                else:
                    endings[index] = Change(ending[index], decided[0], decided[1], model=Job)
        await transition_many(session, endings, actor=self.actor)
        for job in ending:
            if unbound.get(job.id, 0) > 0:
                await release_unbound(session, job.id, job.depth)
        if endings:
            await notifications.notify(session, JOBS_TOPIC)

    # ---------------------------------------------------------------- logs

    async def _ingest_all(self) -> None:
        for worker_id in list(self.cursors):
            await self._ingest(worker_id, final=False)

    async def _ingest(self, worker_id: str, *, final: bool) -> None:
        async with self.log_lock:
            cursor = self.cursors.get(worker_id)
            proc = self.procs.get(worker_id)
            if cursor is None or proc is None:
                return
            while True:
                lines, new_offset = cursor.read_new(final=final)
                if not lines and new_offset == cursor.offset:
                    return
                await self._store_lines(proc, cursor, lines, new_offset)
                if not final:
                    return

    async def _store_lines(
        self, proc: WorkerProcess, cursor: LogCursor, lines: list[str], new_offset: int
    ) -> None:
        agent = self.agents.agents.get(str(proc.extra.get("agent")))
        job_id = str(proc.extra["job_id"])
        now = utcnow()
        async with self.db.session() as session:
            for i, line in enumerate(lines):
                session.add(
                    WorkerLog(
                        worker_id=proc.worker_id,
                        job_id=job_id,
                        seq=cursor.lines + i,
                        text=line,
                        created_at=now,
                    )
                )
                if agent is not None:
                    await self._record_agent_event(session, agent, proc, job_id, line)
            await session.execute(
                update(Worker)
                .where(Worker.id == proc.worker_id)
                .values(log_offset=new_offset, log_lines=cursor.lines + len(lines))
            )
            await notifications.notify(session, "logs")
        cursor.offset = new_offset
        cursor.lines += len(lines)

    async def _record_agent_event(
        self, session: AsyncSession, agent: Agent, proc: WorkerProcess, job_id: str, line: str
    ) -> None:
        for event in agent.parse_events(line):
            if event.kind == "init" and event.data.get("session_id"):
                proc.extra["agent_session_id"] = event.data["session_id"]
            elif event.kind == "message" and event.data.get("text"):
                proc.extra["agent_last_message"] = event.data["text"]
            elif event.kind == "tool_refused":
                # A tool call the agent's CLI did not run: its outcome decides whether that fails the run.
                refused = proc.extra.get("agent_refused")
                proc.extra["agent_refused"] = [*(refused if isinstance(refused, list) else []), event.data]
            elif event.kind == "result":
                # Agents whose final event carries only usage (Codex) still get a final message
                # and a session id (to resume) from what they said earlier in the run.
                result = dict(event.data)
                if isinstance(proc.extra.get("agent_refused"), list):
                    result.setdefault("refused_tools", proc.extra["agent_refused"])
                if not result.get("result") and proc.extra.get("agent_last_message"):
                    result["result"] = proc.extra["agent_last_message"]
                if not result.get("session_id") and proc.extra.get("agent_session_id"):
                    result["session_id"] = proc.extra["agent_session_id"]
                proc.extra["agent_result"] = result
                await self._add_spend(session, proc.worker_id, event.data)
            elif event.kind == "api_retry":
                proc.extra["agent_api_retry"] = event.data
            record_event(
                session,
                job_id=job_id,
                worker_id=proc.worker_id,
                kind=f"agent.{event.kind}",
                actor=f"worker:{proc.worker_id}",
                data=event.data,
                created_at=utcnow(),
            )

    async def _add_spend(self, session: AsyncSession, worker_id: str, result: dict[str, Any]) -> None:
        """Add one run's reported cost and tokens to the worker (a resumed worker runs several times)."""
        usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
        assert isinstance(usage, dict)

        def number(value: Any) -> float:
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

        cost = number(result.get("total_cost_usd"))
        tokens_in = int(
            number(usage.get("input_tokens"))
            + number(usage.get("cache_creation_input_tokens"))
            + number(usage.get("cache_read_input_tokens"))
        )
        tokens_out = int(number(usage.get("output_tokens")))
        if not (cost or tokens_in or tokens_out):
            return
        await session.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(
                cost_usd=Worker.cost_usd + cost,
                input_tokens=Worker.input_tokens + tokens_in,
                output_tokens=Worker.output_tokens + tokens_out,
            )
        )
        self.spend_changed = True
        self.wake.set()

    # ---------------------------------------------------------------- recovery

    async def _reclaim(self, *, force_same_host: bool = False) -> None:
        """Take over jobs of engines that stopped heartbeating (or, on this host, whose process is gone)."""
        self.last_reclaim = time.monotonic()
        now = utcnow()
        async with self.db.session() as session:
            engines = await queries.list_engines(session)
            live = {e.id for e in engines if e.heartbeat_at >= now - self.lease}
            for record in engines:
                if (
                    record.id != self.id
                    and record.host == self.executor.host
                    and record.pid != os.getpid()
                    and not pid_alive(record.pid)
                ):
                    live.discard(record.id)  # crashed on this host: no need to wait for the lease
            live.add(self.id)
            orphans = await queries.orphaned_jobs(session, live)
            dead = {e.id for e in engines if e.id not in live}
            for engine_id in dead:
                await queries.unregister_engine(session, engine_id)
        if not orphans:
            return
        log.warning(
            "engine %s taking over %d job(s) of dead engine(s) %s", self.id, len(orphans), sorted(dead)
        )
        reconciler = Reconciler(self.executor)
        for job in orphans:
            try:
                async with self.db.session() as session:
                    if not await queries.take_over_job(session, job.id, job.engine_id, self.id):
                        continue
                    for worker in await workers_repo.workers_of_job(session, job.id):
                        await self._recover_worker(session, worker, job, reconciler)
                    await notifications.notify(session, JOBS_TOPIC)
            except Exception:
                # One job that cannot be taken over must not stop the others (or the engine from
                # starting): its transaction rolled back, so the next reclaim pass tries again.
                log.exception("engine %s could not take over job %s; will retry", self.id, job.id)
        self.wake.set()

    async def _recover_worker(
        self, session: AsyncSession, worker: Worker, job: Job, reconciler: Reconciler
    ) -> None:
        run_dir = self.runs_dir / worker.id
        pid, start_time = worker.pid, worker.pid_start_time
        if pid is None and (run_dir / PID_FILE).exists():
            # Started, but the engine died before recording it: the wrapper wrote its PID.
            with contextlib.suppress(ValueError, IndexError, OSError):
                fields = (run_dir / PID_FILE).read_text().split()
                pid = int(fields[0])
                start_time = int(fields[1]) if len(fields) > 1 else None
                if start_time is None:
                    found = self.executor.find_started(run_dir)
                    start_time = found[1] if found is not None and found[0] == pid else None
                await session.execute(
                    update(Worker)
                    .where(Worker.id == worker.id)
                    .values(pid=pid, pid_start_time=start_time, host=self.executor.host, run_dir=str(run_dir))
                )
                if worker.status == WorkerStatus.IDLE:
                    worker = await transition_worker(
                        session, worker.id, WorkerStatus.RUNNING, actor=self.actor, reason="adopted"
                    )
                    if job.status == JobStatus.PENDING.value:
                        with contextlib.suppress(InvalidTransition):
                            await transition_job(
                                session,
                                job.id,
                                JobStatus.RUNNING,
                                actor=self.actor,
                                reason="first worker adopted",
                            )
        if pid is None:
            if worker.status in WORKER_FINAL and worker.holds_slot:
                await slots_repo.worker_release_slot(session, worker.id, job.id, job.depth)
            return  # IDLE and never started: it starts normally
        await session.execute(update(Worker).where(Worker.id == worker.id).values(engine_id=self.id))
        if not self.executor.reaches(worker.host):
            await self._fail(session, worker, f"lost: its engine on host {worker.host} stopped heartbeating")
            return
        proc = self.executor.adopt(worker.id, pid, start_time or 0, run_dir)
        if proc is not None:
            # The process may disagree with its record (an engine killed between an API call
            # and its signal): make it follow, both ways.
            done = reconciler.reconcile(proc, worker.status)
            if done is not None:
                log.warning("engine %s: adopted worker %s: %s", self.id, worker.id, done)
                record_event(
                    session,
                    job_id=job.id,
                    worker_id=worker.id,
                    kind="worker.reconciled",
                    actor=self.actor,
                    reason=done,
                    data={"pid": pid, "status": worker.status},
                    created_at=utcnow(),
                )
            self._supervise(proc, job, offset=worker.log_offset, lines=worker.log_lines)
            log.info("engine %s adopted worker %s (pid %s)", self.id, worker.id, pid)
            return
        # The process is gone: learn how it ended, if the wrapper could say.
        gone = WorkerProcess(worker.id, pid, start_time or 0, run_dir, exited=True)
        gone.extra.update(agent=job.agent, job_id=job.id, depth=job.depth)
        self.procs[worker.id] = gone
        self.cursors[worker.id] = LogCursor(
            gone.output_path, offset=worker.log_offset, lines=worker.log_lines
        )
        if read_exit_code(run_dir) is None and worker.status in WORKER_LIVE:
            with contextlib.suppress(InvalidTransition):
                await transition_worker(
                    session,
                    worker.id,
                    WorkerStatus.FAILED,
                    actor=self.actor,
                    reason="lost: the process ended while no engine supervised it, without an exit status",
                )
        self.exited.append(gone)
