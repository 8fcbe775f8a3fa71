"""Recovery: a live engine takes over the jobs of engines that stopped heartbeating (or, on this
host, whose process is gone), and adopts their workers: a process still running is supervised
again (made to follow its recorded status), one that ended is recorded as it ended."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.errors import InvalidTransition
from orchestrator.core.states import WORKER_FINAL, WORKER_LIVE, JobStatus, WorkerStatus
from orchestrator.db.availability import OUTAGES
from orchestrator.db.models import Job, Worker, utcnow
from orchestrator.db.topics import Topic
from orchestrator.db.transitions import transition_job, transition_worker
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.ledger import Ledger
from orchestrator.engine.logs import LogCursor
from orchestrator.engine.queries import engines as engine_queries
from orchestrator.engine.reconcile import Reconciler
from orchestrator.engine.remote_workspace import end_unrecorded, lost_reason
from orchestrator.engine.supervision import (
    RECLAIM_INTERVAL_SECONDS,
    EngineContext,
    Supervised,
    Supervisor,
    log,
)
from orchestrator.executors.local import PID_FILE, WorkerProcess, pid_alive, read_exit_code
from orchestrator.resources import repository as slots_repo
from orchestrator.workers import repository as workers_repo


class Recovery:
    def __init__(self, ctx: EngineContext, sup: Supervisor, ledger: Ledger) -> None:
        self.ctx = ctx
        self.sup = sup
        self.ledger = ledger
        self.lease = timedelta(seconds=ctx.settings.orchestrator_engine_lease_seconds)
        self.last_reclaim = 0.0
        self.judge_peers_after = 0.0  # no peer is declared dead before this (monotonic) time

    async def reclaim(self, *, force_same_host: bool = False) -> None:
        """Take over jobs of engines that stopped heartbeating (or, on this host, whose process is gone)."""
        since, self.last_reclaim = self.last_reclaim, time.monotonic()
        if since and self.last_reclaim - since > max(
            self.lease.total_seconds() / 3, 2 * RECLAIM_INTERVAL_SECONDS
        ):
            # No pass for longer than a heartbeat interval: the database was unreachable (or this
            # process stalled), and peers' heartbeats failed meanwhile too. Give them one lease to
            # heartbeat again before calling any dead, else each engine takes over the others'
            # live workers when a restarted database comes back.
            self.judge_peers_after = self.last_reclaim + self.lease.total_seconds()
        now = utcnow()
        async with self.ctx.db.session() as session:
            engines = await engine_queries.list_engines(session)
            live = {e.id for e in engines if e.heartbeat_at >= now - self.lease}
            if self.last_reclaim < self.judge_peers_after:
                live = {e.id for e in engines}
            for record in engines:
                if (
                    record.id != self.ctx.id
                    and record.host == self.ctx.executor.host
                    and record.pid != os.getpid()
                    and not pid_alive(record.pid)
                ):
                    live.discard(record.id)  # crashed on this host: no need to wait for the lease
            live.add(self.ctx.id)
            orphans = await engine_queries.orphaned_jobs(session, live)
            dead = {e.id for e in engines if e.id not in live}
            for engine_id in dead:
                await engine_queries.unregister_engine(session, engine_id)
        if not orphans:
            return
        log.warning(
            "engine %s taking over %d job(s) of dead engine(s) %s",
            self.ctx.id,
            len(orphans),
            sorted({str(job.engine_id) for job in orphans}),
        )
        reconciler = Reconciler(self.ctx.executor)
        for job in orphans:
            try:
                async with self.ctx.db.session() as session:
                    if not await engine_queries.take_over_job(session, job.id, job.engine_id, self.ctx.id):
                        continue
                    for worker in await workers_repo.workers_of_job(session, job.id):
                        await self.recover_worker(session, worker, job, reconciler)
                    await unit_of_work(session).publish(Topic.JOBS)
            except Exception as exc:
                # One job that cannot be taken over must not stop the others (or the engine from
                # starting): its transaction rolled back, so the next reclaim pass tries again.
                if OUTAGES.report(exc, f"engine {self.ctx.id}: taking over job {job.id}") is None:
                    log.exception("engine %s could not take over job %s; will retry", self.ctx.id, job.id)
        self.sup.wake.set()

    async def recover_worker(
        self, session: AsyncSession, worker: Worker, job: Job, reconciler: Reconciler
    ) -> None:
        """Adopt one worker of a job taken over: its process if it runs, else how it ended."""
        run_dir = self.ctx.runs_dir / worker.id
        pid, start_time = worker.pid, worker.pid_start_time
        if pid is None and (run_dir / PID_FILE).exists():
            worker, pid, start_time = await self._found_by_pid_file(session, worker, job)
        if pid is None:
            if worker.status in WORKER_FINAL and worker.holds_slot:
                # Ended before its start was recorded: what that start may have started goes first
                # (raises while the cluster cannot be asked: the take-over is retried).
                await asyncio.to_thread(end_unrecorded, self.ctx.executor, worker.id)
                await slots_repo.worker_release_slot(session, worker.id, job.id, job.depth)
            return  # IDLE and never started: it starts normally
        await engine_queries.take_over_worker(session, worker.id, self.ctx.id)
        if not self.ctx.executor.reaches(worker.host):
            await self.ledger.fail(
                session, worker, f"lost: its engine on host {worker.host} stopped heartbeating"
            )
            return
        # In a thread: a cluster executor asks the worker's node (up to its call timeout while
        # the node or the cluster does not answer), and the event loop serves the API meanwhile.
        proc = await asyncio.to_thread(self.ctx.executor.adopt, worker.id, pid, start_time or 0, run_dir)
        if proc is not None:
            await self._adopt(session, proc, worker, job, reconciler)
            return
        # The process is gone: learn how it ended, if the wrapper could say.
        gone = WorkerProcess(worker.id, pid, start_time or 0, run_dir, exited=True)
        self.sup.live[worker.id] = Supervised(
            proc=gone,
            job_id=job.id,
            agent=job.agent,
            depth=job.depth,
            in_repository=None,
            memory_mb=0,
            cursor=LogCursor(gone.output_path, offset=worker.log_offset, lines=worker.log_lines),
        )
        if read_exit_code(run_dir) is None and worker.status in WORKER_LIVE:
            # A node that died meanwhile says so (a cluster executor knows); else how it ended.
            lost = await asyncio.to_thread(lost_reason, self.ctx.executor, worker.host)
            with contextlib.suppress(InvalidTransition):
                await transition_worker(
                    session,
                    worker.id,
                    WorkerStatus.FAILED,
                    actor=self.ctx.actor,
                    reason=lost
                    or "lost: the process ended while no engine supervised it, without an exit status",
                )
        self.sup.exited.append(gone)

    async def _found_by_pid_file(
        self, session: AsyncSession, worker: Worker, job: Job
    ) -> tuple[Worker, int | None, int | None]:
        """Started, but the engine died before recording it: the wrapper wrote its PID."""
        run_dir = self.ctx.runs_dir / worker.id
        pid, start_time = worker.pid, worker.pid_start_time
        with contextlib.suppress(ValueError, IndexError, OSError):
            fields = (run_dir / PID_FILE).read_text().split()
            pid = int(fields[0])
            start_time = int(fields[1]) if len(fields) > 1 else None
            if start_time is None:
                found = self.ctx.executor.find_started(run_dir)
                start_time = found[1] if found is not None and found[0] == pid else None
            host = self.ctx.executor.host
            await engine_queries.record_found_process(session, worker.id, pid, start_time, host, str(run_dir))
            if worker.status == WorkerStatus.IDLE:
                worker = await transition_worker(
                    session, worker.id, WorkerStatus.RUNNING, actor=self.ctx.actor, reason="adopted"
                )
                if job.status == JobStatus.PENDING.value:
                    with contextlib.suppress(InvalidTransition):
                        await transition_job(
                            session,
                            job.id,
                            JobStatus.RUNNING,
                            actor=self.ctx.actor,
                            reason="first worker adopted",
                        )
        return worker, pid, start_time

    async def _adopt(
        self, session: AsyncSession, proc: WorkerProcess, worker: Worker, job: Job, reconciler: Reconciler
    ) -> None:
        # The process may disagree with its record (an engine killed between an API call and its
        # signal): make it follow, both ways (in a thread, as the adoption: it may ask a node).
        done = await asyncio.to_thread(reconciler.reconcile, proc, worker.status)
        if done is not None:
            log.warning("engine %s: adopted worker %s: %s", self.ctx.id, worker.id, done)
            unit_of_work(session).record_event(
                job_id=job.id,
                worker_id=worker.id,
                kind="worker.reconciled",
                actor=self.ctx.actor,
                reason=done,
                data={"pid": proc.pid, "status": worker.status},
                created_at=utcnow(),
            )
        self.sup.supervise(proc, job, offset=worker.log_offset, lines=worker.log_lines)
        log.info("engine %s adopted worker %s (pid %s)", self.ctx.id, worker.id, proc.pid)
