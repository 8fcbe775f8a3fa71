"""Control: make the supervised processes follow the statuses the database holds (pause,
resume, stop: SIGSTOP, SIGCONT, SIGTERM then SIGKILL after the grace), and stop in the database
the workers that must end: a timeout, a fork bomb held at its process limit, a job that ended
while its worker was starting, a tree over its budget."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import engine_actor
from orchestrator.core.errors import InvalidTransition
from orchestrator.core.states import JOB_FINAL, WORKER_FINAL, WORKER_LIVE, JobStatus, WorkerStatus
from orchestrator.db.models import utcnow
from orchestrator.db.topics import Topic
from orchestrator.db.transitions import transition_worker
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine import budget as budgets
from orchestrator.engine.supervision import (
    PIDS_CHECK_SECONDS,
    RECLAIM_INTERVAL_SECONDS,
    EngineContext,
    Supervised,
    Supervisor,
)
from orchestrator.executors.local import WorkerProcess


class Control:
    def __init__(self, ctx: EngineContext, sup: Supervisor) -> None:
        self.ctx = ctx
        self.sup = sup
        self.last_pids_check = 0.0
        self.last_budget_check = 0.0

    async def apply(self, read: dict[str, tuple[str, str]]) -> None:
        """Make processes follow `read` (worker id -> its status and its job's, as the pass's
        transaction read them); a worker to stop is written in a transaction of its own (rare)."""
        if not self.sup.live:
            return
        now = time.monotonic()
        statuses = {worker_id: status for worker_id, (status, _) in read.items()}
        await self._stop_in_database(now, read, statuses)
        grace = self.ctx.settings.orchestrator_terminate_grace_seconds
        planned = [
            (record.proc, signals)
            for worker_id, record in list(self.sup.live.items())
            if (signals := self._signals(record, statuses.get(worker_id), now, grace))
        ]
        if planned and self.ctx.executor.cluster_state() is not None:
            # Workers on a cluster: a signal is a call that waits for the worker's node (up to
            # its timeout, for a node that hangs): not on the event loop, which serves the API.
            await asyncio.to_thread(self._send_all, planned, now)
        elif planned:
            self._send_all(planned, now)
        if any(
            s.proc.stop_signal_sent_at is not None and not s.proc.kill_sent for s in self.sup.live.values()
        ):
            # Come back for the SIGKILL deadline even if nothing else happens.
            assert self.sup.loop is not None
            self.sup.loop.call_later(min(grace, 0.5) or 0.1, self.sup.wake.set)

    async def _stop_in_database(
        self, now: float, read: dict[str, tuple[str, str]], statuses: dict[str, str]
    ) -> None:
        orphans = [
            (worker_id, job_status)
            for worker_id, (worker_status, job_status) in read.items()
            if worker_status in WORKER_LIVE and JobStatus(job_status) in JOB_FINAL
        ]
        overdue = [
            worker_id
            for worker_id, record in self.sup.live.items()
            if record.deadline is not None
            and now >= record.deadline
            and statuses.get(worker_id) in (WorkerStatus.RUNNING, WorkerStatus.PAUSED)
        ]
        bombs = self._at_process_limit(now, statuses)
        if not (orphans or overdue or bombs):
            return
        async with self.ctx.db.session() as session:
            for worker_id, reason in bombs.items():
                # A fork bomb is held at its limit; the worker is stopped, not left spinning.
                await self._mark_stopped(session, statuses, worker_id, WorkerStatus.FAILED, reason)
            for worker_id, job_status in orphans:
                # Its job ended while it was being started (a cancel that committed between this
                # engine's claim and the start): a worker never outlives its job.
                reason = f"its job is {job_status}"
                await self._mark_stopped(session, statuses, worker_id, WorkerStatus.TERMINATED, reason)
            for worker_id in overdue:
                await self._mark_stopped(session, statuses, worker_id, WorkerStatus.FAILED, "timeout")
                self.sup.live[worker_id] = dataclasses.replace(self.sup.live[worker_id], deadline=None)

    @staticmethod
    def _signals(record: Supervised, status: str | None, now: float, grace: float) -> list[signal.Signals]:
        """What `record`'s process must be sent to follow `status` (none: it follows already)."""
        proc = record.proc
        if proc.exited:
            return []
        if status == WorkerStatus.PAUSED and not proc.applied_paused:
            return [signal.SIGSTOP]
        if status == WorkerStatus.RUNNING and proc.applied_paused:
            return [signal.SIGCONT]
        if status is not None and status in WORKER_FINAL:
            if proc.stop_signal_sent_at is None:
                return [signal.SIGTERM, signal.SIGCONT]  # a stopped process ends too
            if not proc.kill_sent and now - proc.stop_signal_sent_at >= grace:
                return [signal.SIGKILL]
        return []

    def _send_all(self, planned: list[tuple[WorkerProcess, list[signal.Signals]]], now: float) -> None:
        send = self.ctx.executor.send
        for proc, signals in planned:
            sent = [send(proc, sig) for sig in signals]
            if signals[0] == signal.SIGSTOP:
                proc.applied_paused = sent[0]
            elif signals[0] == signal.SIGCONT:
                proc.applied_paused = False
            elif signals[0] == signal.SIGTERM:
                proc.stop_signal_sent_at = now
            else:
                proc.kill_sent = True

    def _at_process_limit(self, now: float, statuses: dict[str, str]) -> dict[str, str]:
        """Running workers that hit their process limit (checked every PIDS_CHECK_SECONDS)."""
        groups = self.ctx.executor.cgroups
        if groups is None or not groups.usable or now - self.last_pids_check < PIDS_CHECK_SECONDS:
            return {}
        self.last_pids_check = now
        found: dict[str, str] = {}
        for worker_id, record in self.sup.live.items():
            if record.proc.exited or statuses.get(worker_id) != WorkerStatus.RUNNING:
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
                actor=self.ctx.actor,
                reason=reason,
                values={"stop_requested_at": utcnow()},
            )
            statuses[worker_id] = target.value

    async def enforce_budgets(self) -> None:
        """Stop the trees over budget (at once after new spend, else every reclaim interval)."""
        now = time.monotonic()
        if not self.sup.spend_changed and now - self.last_budget_check < RECLAIM_INTERVAL_SECONDS:
            return
        self.sup.spend_changed = False
        self.last_budget_check = now
        async with self.ctx.db.session() as session:
            finishing = frozenset(w for w, s in self.sup.live.items() if s.run.result is not None)
            if await budgets.enforce(session, self.ctx.id, engine_actor(self.ctx.id), finishing):
                await unit_of_work(session).publish(Topic.CONTROL)
