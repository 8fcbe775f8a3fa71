"""The engine: claims jobs, gives workers slots, starts and supervises their processes, and
decides how jobs end. Several engines (processes, hosts) share one database; each job has exactly
one owning engine, and a dead engine's jobs are taken over by a live one.

The database holds what should be (a worker PAUSED, TERMINATED, ...); the engine that owns the
worker's process makes reality follow, and records what really happened (exit codes, output).

This module is the coordinator: the life cycle, the loops, and `tick`, one pass as a sequence
of phases, each in a module of its own (supervision, scheduler, launcher, ledger, control,
ingest, recovery, resume). It alone imports the phases.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable

from orchestrator.agents.registry import AgentRegistry
from orchestrator.core.address import ApiAddress, settings_address
from orchestrator.core.auth import engine_actor
from orchestrator.core.config import Settings
from orchestrator.core.ids import new_engine_id
from orchestrator.db import topics
from orchestrator.db.availability import CONNECT_TIMEOUT_SECONDS, OUTAGES, ConnectFailed
from orchestrator.db.session import Database
from orchestrator.db.topics import Topic
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.control import Control
from orchestrator.engine.governor import Governor
from orchestrator.engine.ingest import Ingest
from orchestrator.engine.integrate import Integrator
from orchestrator.engine.launcher import Launched, Launcher
from orchestrator.engine.ledger import Ending, Ledger
from orchestrator.engine.queries import engines as engine_queries
from orchestrator.engine.queries import workers as worker_queries
from orchestrator.engine.queries.state import pass_state
from orchestrator.engine.recovery import Recovery
from orchestrator.engine.resume import Resumer
from orchestrator.engine.scheduler import Ready, Scheduler
from orchestrator.engine.slots import SlotMoves
from orchestrator.engine.supervision import (
    BLOCKED_PASS_GAP_SECONDS,
    IDLE_SLACK,
    LOG_INTERVAL_SECONDS,
    RECLAIM_INTERVAL_SECONDS,
    SQLITE_WATCH_SECONDS,
    START_BATCH,
    STOP_STEP_SECONDS,
    WORKER_TOKEN_SCOPES,
    EngineContext,
    Supervisor,
    log,
    worker_limits,
)
from orchestrator.executors.factory import make_executor
from orchestrator.executors.local import LocalExecutor, WorkerProcess

__all__ = ["IDLE_SLACK", "WORKER_TOKEN_SCOPES", "Engine", "worker_limits"]


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
        self.db = database
        self.agents = agents
        self.executor = executor or make_executor(settings)
        self.id = new_engine_id()
        self.actor = engine_actor(self.id).name
        self.runs_dir = settings.data_dir / "runs"
        self.ctx = EngineContext(
            settings=settings,
            db=database,
            agents=agents,
            executor=self.executor,
            # Where workers reach the API (the server's own socket; HOST/PORT for a lone engine).
            address=address or settings_address(settings),
            id=self.id,
            actor=self.actor,
            runs_dir=self.runs_dir,
            workspaces_dir=settings.data_dir / "workspaces",
        )
        self.sup = Supervisor(self.ctx)
        self.wake = self.sup.wake
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.unrecorded: list[Launched] = []  # launched, to be recorded by the next pass
        self.control_statuses: dict[str, tuple[str, str]] = {}  # read by the pass, for control
        self.last_full_pass = 0.0  # monotonic time of the last pass run in full (not _quiet_pass)
        self.integrator = Integrator(self)
        self.governor = Governor(settings)
        self.ingest = Ingest(self.ctx, self.sup)
        self.launcher = Launcher(self.ctx, self.sup)
        self.control = Control(self.ctx, self.sup)
        self.ledger = Ledger(self.ctx, self.sup, self.ingest, self.governor, self.integrator.gate)
        self.scheduler = Scheduler(self.ctx, self.sup, self.governor)
        self.resumer = Resumer(self.ctx, self.sup, self.governor, self.launcher, self.ledger)
        self.recovery = Recovery(self.ctx, self.sup, self.ledger)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.sup.loop = asyncio.get_running_loop()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        async with self.db.session() as session:
            await engine_queries.register_engine(session, self.id, self.executor.host, os.getpid())
        topics.add_listener(self._on_notify)
        await asyncio.to_thread(self.executor.allow_api, self.ctx.address.url)  # executors/netguard.py
        await self.recovery.reclaim(force_same_host=True)
        if self.executor.cgroups is not None and self.executor.cgroups.usable:
            stale = await asyncio.to_thread(self.executor.cgroups.remove_stale, set(self.sup.live))
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
        topics.remove_listener(self._on_notify)
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
            await asyncio.wait_for(self.ingest.ingest_all(), STOP_STEP_SECONDS)
        for record in self.sup.live.values():
            self.executor.unwatch(record.proc)  # the process outlives us by design; the next engine adopts it
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._unregister(), STOP_STEP_SECONDS)
        self.launcher.shutdown()

    async def _unregister(self) -> None:
        async with self.db.session() as session:
            await engine_queries.unregister_engine(session, self.id)

    def _on_notify(self, _topics: set[str]) -> None:
        loop = self.sup.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.wake.set()
        else:
            loop.call_soon_threadsafe(self.wake.set)

    # ---------------------------------------------------------------- loops

    async def _run_forever(self, body: Callable[[], Awaitable[None]], name: str) -> None:
        while not self.stopping:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # An outage to wait out: one line per outage for the process, not one per attempt.
                if OUTAGES.report(exc, f"engine {self.id}: {name} loop") is None:
                    log.exception("engine %s: %s loop failed; retrying", self.id, name)
                await asyncio.sleep(0.5)

    async def _main_loop(self) -> None:
        while not self.stopping:
            self.wake.clear()
            await self.tick()
            if self.stopping:
                break
            passed_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.settings.orchestrator_poll_seconds)
            if self.scheduler.blocked:
                await self._space_blocked_pass(passed_at)

    async def _space_blocked_pass(self, passed_at: float) -> None:
        """After a blocked pass (scheduler.py), wait out BLOCKED_PASS_GAP_SECONDS from its end
        before the next, unless one of this engine's workers exits (its slot is what the queue
        waits for): every submit's commit woke a pass that found the quota still full, which
        cost the API processes most of the CPU the engine took while jobs queued. A slot another
        engine returns, a control request or a job at another depth waits at most the gap."""
        deadline = passed_at + BLOCKED_PASS_GAP_SECONDS
        while not self.stopping and not self.sup.exited and (left := deadline - time.monotonic()) > 0:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=left)

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.orchestrator_engine_lease_seconds / 3
        while not self.stopping:
            await asyncio.sleep(interval)
            async with self.db.session() as session:
                alive = await engine_queries.heartbeat(session, self.id)
                if not alive:
                    log.warning("engine %s was declared dead by a peer; registering again", self.id)
                    await engine_queries.register_engine(session, self.id, self.executor.host, os.getpid())

    async def _log_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(LOG_INTERVAL_SECONDS)
            await self.ingest.ingest_all()

    async def _listen_loop(self) -> None:
        """PostgreSQL LISTEN: wake on commits made by any process."""
        import asyncpg

        dsn = self.settings.async_database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        try:
            conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SECONDS)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ConnectFailed(exc) from exc  # down, dropped, full, refusing: an outage (one line)
        try:
            await conn.add_listener(topics.CHANNEL, lambda *_: self.wake.set())
            self.wake.set()  # (again) listening: a pass sees what was committed while it was not
            while not self.stopping:
                await asyncio.sleep(5)
                try:
                    await conn.execute("SELECT 1", timeout=CONNECT_TIMEOUT_SECONDS)
                except TimeoutError as exc:
                    raise ConnectionError("the LISTEN connection's keep-alive got no answer") from exc
                except asyncpg.InterfaceError:
                    if not conn.is_closed():
                        raise
                    # The server ended the session while it idled (terminated, shut down, the
                    # database dropped), maybe during an outage already over: found up to a
                    # keep-alive later, it says nothing of the database now. Connect again at
                    # once (`_run_forever`); a connect that fails is the outage line, if any.
                    log.warning(
                        "engine %s: the server closed the LISTEN connection; listening again", self.id
                    )
                    return
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)
            conn.terminate()  # if close() could not say goodbye (the server is gone); else a no-op

    async def _sqlite_watch_loop(self) -> None:
        """SQLite has no NOTIFY: wake when another connection commits (`PRAGMA data_version`
        changes), which costs a shared-memory read every SQLITE_WATCH_SECONDS instead of a
        full pass."""
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
        if await self._quiet_pass():
            return
        self.last_full_pass = time.monotonic()
        batch, self.sup.exited = self.sup.exited, []
        starts, self.unrecorded = self.unrecorded, []
        as_read = [(row, row.status) for item in starts for row in (item.worker, item.job)]
        try:
            if starts and any(self._in_repository(proc) for proc in batch):
                # A worktree is committed before its exit is recorded, from the branch its
                # recorded start names: record the starts first (rare: git work takes a while).
                await self._record_starts_now(starts)
                starts = []
            endings = await self.ledger.collect_exits(batch)
            ready = await self._record_and_schedule(starts, endings)
        except BaseException:
            # Not recorded: the next pass tries again, from the statuses as read (a transaction that
            # rolled back, e.g. the database went away, changed them in memory only).
            for row, status in as_read:
                row.status = status
            self.sup.exited = batch + self.sup.exited
            self.unrecorded = starts + self.unrecorded
            raise
        self.sup.forget(batch)
        self.integrator.launch()
        statuses, self.control_statuses = self.control_statuses, {}
        await self._after_pass(statuses)
        if ready:
            launched = await self.launcher.launch_all(ready)
            for item in launched:
                if item.spawned is not None:
                    self.sup.supervise(
                        item.spawned.proc, item.job, offset=0, lines=0, memory_mb=item.spawned.memory_mb
                    )
            self.unrecorded.extend(launched)
            self.wake.set()  # the next pass records them, even if nothing else happens

    async def _after_pass(self, statuses: dict[str, tuple[str, str]]) -> None:
        """What every pass does after its transaction (each step returns at once when it has
        nothing to do): recovery when due, control on `statuses`, parked workers, budgets."""
        if time.monotonic() - self.recovery.last_reclaim > RECLAIM_INTERVAL_SECONDS:
            await self.recovery.reclaim()
        await self.control.apply(statuses)
        await self.resumer.resume_parked()
        await self.control.enforce_budgets()

    async def _quiet_pass(self) -> bool:
        """After a blocked pass (scheduler.py) that held back no IDLE worker, a pass reads only
        the pools, the backlog, whether a job waits or may settle, and control's statuses (one
        statement): while those are as the blocked pass read them, no slot came back and nothing
        is to settle, so the rest (a transaction of several statements) would find the same, and
        control alone acts. Every submit's commit wakes a pass, and the engine runs in an API
        process. Anything this read cannot see (a child job ending elsewhere) waits at most the
        poll interval: a pass then runs in full."""
        fingerprint = self.scheduler.blocked_fingerprint
        if (
            fingerprint is None
            or self.sup.exited
            or self.unrecorded
            or time.monotonic() - self.last_full_pass >= self.settings.orchestrator_poll_seconds
        ):
            return False
        async with self.db.read_session() as session:
            state = await pass_state(session, self.id, list(self.sup.live))
        if state.fingerprint != fingerprint:
            return False
        self.control_statuses = {}
        await self._after_pass(state.statuses)
        return True

    def _in_repository(self, proc: WorkerProcess) -> bool:
        record = self.sup.live.get(proc.worker_id)
        return record is not None and bool(record.in_repository)

    async def _record_starts_now(self, starts: list[Launched]) -> None:
        async with self.db.session() as session:
            await self.ledger.record_starts(session, starts)
            await unit_of_work(session).publish(Topic.JOBS)

    async def _record_and_schedule(self, starts: list[Launched], endings: list[Ending]) -> Ready:
        """Record the workers started and ended since the last pass (the slots of the ended come
        back), settle their jobs, then claim PENDING jobs, create their workers, and give IDLE
        workers slots: one transaction."""
        # PostgreSQL: the pass's slot moves (exits' returns, new slots) netted, one statement.
        moves = SlotMoves() if self.db.is_postgres else None
        async with self.db.session() as session:
            running = await self.ledger.record_starts(session, starts) if starts else {}
            if endings:
                await self.ledger.record_exits(session, endings, running, moves)
            await self.ledger.settle_jobs(session)
            if starts or endings:
                await unit_of_work(session).publish(Topic.JOBS)
            ready = await self.scheduler.schedule(session, moves)
            if moves is not None:
                await moves.apply(session, with_events=True)
            # What control (after this transaction) acts on: read here, not in one more (on
            # PostgreSQL the scheduler's first read brought them).
            state = self.scheduler.state
            if state is not None and self.db.is_postgres:
                self.control_statuses = state.statuses
            else:
                self.control_statuses = await worker_queries.worker_statuses(session, list(self.sup.live))
            if session.pending_events:
                # Every event of the pass follows a write of it that changed rows, so the
                # transaction has its id already: the commit need not take one (a round trip).
                session.has_transaction_id = True
        if len(ready) == START_BATCH:
            self.wake.set()  # more to do: come straight back
        return ready
