"""The ledger: what the engine writes about its workers' lives, inside the pass's transaction:
the starts the launcher made (a pass late), the exits (the output drained, the worktree
committed, the agent's outcome judged, rate-limited runs parked), the slots given back, and
the settlement of jobs whose workers have all ended."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.agents.base import Outcome, SandboxProfile
from orchestrator.core.errors import InvalidTransition
from orchestrator.core.states import JOB_TRANSITIONS, WORKER_LIVE, JobStatus, WorkerStatus
from orchestrator.db.models import Job, Worker
from orchestrator.db.topics import Topic
from orchestrator.db.transitions import Change, lock_statuses, transition_many, transition_worker
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.governor import Governor
from orchestrator.engine.ingest import Ingest
from orchestrator.engine.launcher import Launched
from orchestrator.engine.queries import batches
from orchestrator.engine.queries import settle as settle_queries
from orchestrator.engine.queries import workers as worker_queries
from orchestrator.engine.queries.rows import SettlingJob, WorkerEnding, WorkerRow
from orchestrator.engine.remote_workspace import commit_work
from orchestrator.engine.slots import SlotMoves
from orchestrator.engine.starts import first_starts, may_start, record_starts_at_once
from orchestrator.engine.supervision import EngineContext, Supervised, Supervisor
from orchestrator.executors.local import WorkerProcess, read_exit_code
from orchestrator.resources import repository as slots_repo
from orchestrator.resources.service import release_unbound
from orchestrator.workspaces import git
from orchestrator.workspaces import setup as worktree_setup

# Settling asks the integrator how jobs with a repository end (engine/integrate.py): None while
# their integration is still to do.
# `repositories`: the jobs' repositories if the caller read them (else the gate reads them).
Gate = Callable[
    [AsyncSession, dict[str, JobStatus], dict[str, str] | None],
    Awaitable[dict[str, tuple[JobStatus, str] | None]],
]


@dataclass(frozen=True)
class Ending:
    """How a worker's process ended, gathered before the transaction that records it."""

    proc: WorkerProcess
    exit_code: int | None
    limit: str | None  # a cgroup limit that killed it: the reason, whatever the agent says
    result_patch: dict[str, Any]  # what the agent reported, added to the worker's result
    commit: str | None = None  # its worktree committed onto its branch
    diff_stat: str | None = None

    def values(self, current: WorkerRow) -> dict[str, Any]:
        """The worker's columns its exit records."""
        values: dict[str, Any] = {}
        if self.commit is not None:
            values.update(commit=self.commit, diff_stat=self.diff_stat)
        values["exit_code"] = self.exit_code
        values["result"] = {**(current.result or {}), **self.result_patch} or None
        return values


def ending_of(outcome: Outcome | None, exit_code: int | None) -> tuple[WorkerStatus, str]:
    """The status a worker ends in and why: the agent's outcome if it reported one, else its exit."""
    if outcome is not None:
        return (WorkerStatus.COMPLETED if outcome.ok else WorkerStatus.FAILED), outcome.reason
    if exit_code == 0:
        return WorkerStatus.COMPLETED, "exit code 0"
    if exit_code is None:
        return WorkerStatus.FAILED, "killed: the worker ended without an exit status"
    if exit_code > 128:
        return WorkerStatus.FAILED, f"exit code {exit_code} (signal {exit_code - 128})"
    return WorkerStatus.FAILED, f"exit code {exit_code}"


def settlement(
    job: SettlingJob, children: list[tuple[str, str]], workers: list[WorkerEnding]
) -> tuple[JobStatus, str] | None:
    """How a job with no live worker ends, or None while a child or an exit is still pending."""
    if any(
        status not in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED) for _, status in children
    ):
        return None
    if any(w.holds_slot for w in workers):
        return None  # an exit is still being recorded
    bad = [w for w in workers if w.status != WorkerStatus.COMPLETED]
    bad_children = [(cid, status) for cid, status in children if status != JobStatus.COMPLETED]
    if bad:
        first = bad[0]
        reason = f"worker {first.id} {first.status}: {first.status_reason or 'no reason recorded'}"
        if len(bad) > 1:
            reason += f" (and {len(bad) - 1} more)"
        return JobStatus.FAILED, reason
    if bad_children:
        return JobStatus.FAILED, f"child job {bad_children[0][0]} {bad_children[0][1]}"
    return JobStatus.COMPLETED, "all workers and child jobs completed"


class Ledger:
    def __init__(
        self, ctx: EngineContext, sup: Supervisor, ingest: Ingest, governor: Governor, gate: Gate
    ) -> None:
        self.ctx = ctx
        self.sup = sup
        self.ingest = ingest
        self.governor = governor
        self.gate = gate

    # ------------------------------------------------------------ starts

    async def record_starts(self, session: AsyncSession, launched: list[Launched]) -> dict[str, WorkerRow]:
        """Record a pass's started workers (and their jobs' first start) in a few statements; the
        processes are supervised already (their exits may be recorded in the same transaction).
        Returns the workers now RUNNING, as written (their rows stay locked until the commit)."""
        started = [item for item in launched if item.spawned is not None]
        for item in launched:
            if item.spawned is None:
                if item.waiting is not None:  # keeps its slot; a later pass starts it
                    await worker_queries.note_waiting(session, item.worker.id, item.waiting)
                else:
                    await self.fail(session, item.worker, item.error or "could not start")
        if self.ctx.db.is_postgres:
            return await record_starts_at_once(self.ctx, session, started)
        statuses = await lock_statuses(session, Worker, [item.worker.id for item in started])
        changes: list[Change] = []
        for item in started:
            worker = item.worker
            values = item.values(host=self.ctx.executor.host, engine_id=self.ctx.id)
            if statuses.get(worker.id) == worker.status and may_start(worker):
                changes.append(Change(worker, WorkerStatus.RUNNING, "started", values, model=Worker))
            else:
                # Terminated while we were starting it: record the process, then stop it.
                await worker_queries.update_worker(session, worker.id, values)
        await transition_many(session, changes, actor=self.ctx.actor)
        await self._record_first_starts(session, started)
        return {change.known.id: cast(WorkerRow, change.known) for change in changes}

    async def _record_first_starts(self, session: AsyncSession, started: list[Launched]) -> None:
        first = first_starts(started)
        job_statuses = await lock_statuses(session, Job, list(first))
        await transition_many(
            session,
            [
                Change(job, JobStatus.RUNNING, "first worker started", {"started_at": started_at}, model=Job)
                for job, started_at in first.values()
                if job_statuses.get(job.id) == JobStatus.PENDING.value
            ],
            actor=self.ctx.actor,
        )

    # ------------------------------------------------------------ exits

    async def collect_exits(self, batch: list[WorkerProcess]) -> list[Ending]:
        """The last output and the outcome of each ended worker, gathered outside the write
        transaction that records them (a worktree is committed first)."""
        if not batch:
            return []
        for proc in batch:
            await self.ingest.ingest(proc.worker_id, final=True)
        records = {proc.worker_id: self.sup.live.get(proc.worker_id) for proc in batch}
        # Workers in a repository need their row before the write transaction (their worktree is
        # committed first, outside it); the others are read once, in it.
        in_repository = [
            worker_id
            for worker_id, record in records.items()
            if record is None or record.in_repository is not False
        ]
        workers: dict[str, Worker] = {}
        if in_repository:
            async with self.ctx.db.read_session() as session:
                workers = await worker_queries.workers_by_id(session, in_repository)
        # Which limit ended each (its cgroups removed): the whole batch in one thread hand-off, not
        # one per worker (a hand-off costs more than the few cgroup file reads it waits for).
        limits = await asyncio.to_thread(self._endings, batch)
        return [
            await self._collect(proc, records[proc.worker_id], workers.get(proc.worker_id), limit)
            for proc, limit in zip(batch, limits, strict=True)
        ]

    def _endings(self, batch: list[WorkerProcess]) -> list[str | None]:
        return [self.ctx.executor.ending(proc.worker_id) for proc in batch]

    async def _collect(
        self, proc: WorkerProcess, record: Supervised | None, worker: Worker | None, limit: str | None
    ) -> Ending:
        """The exit status, the worktree committed (if any), and what to add to the result."""
        patch: dict[str, Any] = {}
        exit_code = read_exit_code(proc.run_dir)
        if record is not None and isinstance(record.run.result, dict):
            patch.update(record.run.result)
        if record is not None and isinstance(record.run.api_retry, dict):
            patch["api_retry"] = record.run.api_retry
        if worker is None or not worker.branch or not worker.workdir:
            return Ending(proc, exit_code, limit, patch)
        async with self.ctx.db.read_session() as session:
            job = await worker_queries.job(session, worker.job_id)
            job_repo = job.repository if job else None
        skipped: list[str] = []
        max_file_mb = self._max_file_mb(record)
        try:
            async with self.sup.repo_lock(job_repo or ""):
                commit, stat = await asyncio.to_thread(
                    commit_work,
                    self.ctx.executor,
                    self.ctx.settings,
                    job_repo,
                    Path(worker.workdir),
                    proc.run_dir,
                    f"orchestrator: work of {worker.id} (job {worker.job_id})",
                    (worker.result or {}).get("base_commit"),
                    worker.branch,
                    skipped,
                    max_file_mb,
                )
        except (git.GitError, OSError) as exc:
            patch["commit_error"] = str(exc)
            return Ending(proc, exit_code, limit, patch)
        if skipped:
            shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            patch["commit_error"] = f"not committed, at or above max_file_mb ({max_file_mb} MiB): {shown}"
        return Ending(proc, exit_code, limit, patch, commit, stat)

    def _max_file_mb(self, record: Supervised | None) -> int:
        agent = self.ctx.agents.agents.get(record.agent) if record is not None else None
        return agent.sandbox.max_file_mb if agent is not None else SandboxProfile.max_file_mb

    async def record_exits(
        self,
        session: AsyncSession,
        endings: list[Ending],
        running: dict[str, WorkerRow],
        moves: SlotMoves | None = None,
    ) -> None:
        """Record how a pass's workers ended and return their slots: a few statements for all.
        `running`: workers whose start this transaction recorded, so their rows are known.
        `moves` (PostgreSQL): the pass's slot moves, written at its end; without it, now."""
        unknown = [e.proc.worker_id for e in endings if e.proc.worker_id not in running]
        fresh: dict[str, WorkerRow] = {**running, **await worker_queries.exiting_workers(session, unknown)}
        at_once = moves if moves is not None else SlotMoves()
        postgres = self.ctx.db.is_postgres
        changes: list[Change] = []
        plain: list[tuple[str, dict[str, Any]]] = []
        release: list[tuple[str, str, int]] = []
        for ending in endings:
            current = fresh.get(ending.proc.worker_id)
            if current is None:
                continue
            values = ending.values(current)
            decided: tuple[WorkerStatus, str] | None = None
            if current.status in WORKER_LIVE:
                decided = await self._judge(session, current, ending, values)
                if decided is None:
                    continue  # parked: keeps its slot; the engine resumes it after the backoff
            if postgres and current.holds_slot:
                # The row is locked as read: clearing holds_slot with the change that ends the
                # worker returns its slot exactly once.
                values["holds_slot"] = False
                at_once.give_back(current.job_id, current.depth)
            elif not postgres:
                release.append((current.id, current.job_id, current.depth))
            if decided is not None:
                changes.append(Change(current, decided[0], decided[1], values, model=Worker))
            else:
                plain.append((current.id, values))
        await transition_many(session, changes, actor=self.ctx.actor)
        for worker_id, values in plain:
            await worker_queries.update_worker(session, worker_id, values)
        if release:
            await slots_repo.workers_release_slots(session, release)
        if moves is None:
            await at_once.apply(session)

    async def _judge(
        self, session: AsyncSession, current: WorkerRow, ending: Ending, values: dict[str, Any]
    ) -> tuple[WorkerStatus, str] | None:
        """How a live worker ends; None: its run hit a rate limit and it is parked instead."""
        outcome = self.outcome(current, values, ending.exit_code)
        if ending.limit is not None:
            outcome = Outcome(False, ending.limit)  # a limit killed it: that is the reason, not the agent's
        if outcome is not None and outcome.retryable and not ending.proc.kill_sent:
            if await self._park(session, current, values, outcome):
                return None
            outcome = Outcome(False, f"{outcome.reason} (gave up after rate-limit resumes)")
        if outcome is not None and outcome.ok:
            account = self.ctx.account_of(current.agent)
            if account is not None:
                await self.governor.note_ok(session, account)
        return ending_of(outcome, ending.exit_code)

    def outcome(self, worker: WorkerRow, values: dict[str, Any], exit_code: int | None) -> Outcome | None:
        """The agent's own judgement of its run (a failed worktree set-up overrides it)."""
        agent = self.ctx.agents.agents.get(worker.agent)
        if agent is None:
            return None
        failed = worktree_setup.failure(self.ctx.runs_dir / worker.id)
        if failed is not None:
            return Outcome(False, failed)
        result = values.get("result")
        return agent.outcome(result if isinstance(result, dict) else None, exit_code)

    async def _park(
        self, session: AsyncSession, worker: WorkerRow, values: dict[str, Any], outcome: Outcome
    ) -> bool:
        """A rate-limited run: keep the worker RUNNING (and its slot) and resume it after a backoff."""
        account = self.ctx.account_of(worker.agent)
        if account is None or worker.status != WorkerStatus.RUNNING:
            return False
        delay = await self.governor.park(session, worker, values, outcome, account, self.ctx.actor)
        if delay is None:
            return False
        self.sup.wake_in(delay + 0.01)
        return True

    async def fail(
        self, session: AsyncSession, worker: WorkerRow, reason: str, values: dict[str, Any] | None = None
    ) -> None:
        """FAILED with `reason` (unless it has ended already), and its slot back."""
        if worker.status in WORKER_LIVE:
            with contextlib.suppress(InvalidTransition):
                await transition_worker(
                    session,
                    worker.id,
                    WorkerStatus.FAILED,
                    actor=self.ctx.actor,
                    reason=reason,
                    values=values,
                )
        await slots_repo.worker_release_slot(session, worker.id, worker.job_id, worker.depth)

    # ------------------------------------------------------------ settlement

    async def settle_jobs(self, session: AsyncSession) -> None:
        """Decide the outcome of jobs whose workers have all ended and whose children are final."""
        repositories: dict[str, str] | None = None
        if self.ctx.db.is_postgres:  # one statement for the candidates and all they need
            read = await batches.settling(session, self.ctx.id)
            if not read.jobs:
                return
            candidates, children_of, workers_of = read.jobs, read.children, read.workers
            unbound, repositories = read.unbound, read.repositories
        else:  # four reads, each a few microseconds on the driver
            candidates = await settle_queries.jobs_without_live_workers(session, self.ctx.id)
            if not candidates:
                return
            ids = [job.id for job in candidates]
            children_of = await settle_queries.children_statuses(session, ids)
            workers_of = await settle_queries.worker_endings(session, ids)
            unbound = await settle_queries.unbound_slots(session, ids)
        endings: list[Change] = []
        ending: list[SettlingJob] = []
        for job in candidates:
            decided = settlement(job, children_of.get(job.id, []), workers_of.get(job.id, []))
            if decided is not None and decided[0] in JOB_TRANSITIONS[JobStatus(job.status)]:
                endings.append(Change(job, decided[0], decided[1], model=Job))
                ending.append(job)
        # A job with a repository COMPLETES once its result branch is written (engine/integrate.py).
        targets = {c.known.id: JobStatus(c.target) for c in endings}
        gated = await self.gate(session, targets, repositories)
        for index in reversed(range(len(endings))):
            if endings[index].known.id in gated:
                gate = gated[endings[index].known.id]
                if gate is None:
                    del endings[index], ending[index]
                else:
                    endings[index] = Change(ending[index], gate[0], gate[1], model=Job)
        await transition_many(session, endings, actor=self.ctx.actor)
        for job in ending:
            if unbound.get(job.id, 0) > 0:
                await release_unbound(session, job.id, job.depth)
        if endings:
            await unit_of_work(session).publish(Topic.JOBS)
