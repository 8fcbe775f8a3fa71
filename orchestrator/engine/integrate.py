"""The integration phase: when every worker and child of a job in a repository has COMPLETED,
its work is merged into the job's result branch before the job may COMPLETE.

Bottom-up through the tree: a child's job settles (and integrates) first, so its parent merges the
child's result branch, then its own workers' branches, in a stable order (children by creation,
workers by index), with real merge commits, in a temporary worktree (workspaces/merge.py).

The integration's state is a row (`integrations`): `pending` until the result branch is written,
then `done` or `failed`. Settling a job reads that row: a job with a repository COMPLETES only once
its row is `done`. One integration at a time per repository across every engine process
(PostgreSQL: an advisory lock held on one connection; SQLite: a row in `repository_locks`, taken
over from a dead engine). An engine killed mid-merge leaves a `pending` row and a temporary
worktree: the engine that takes the job over removes the worktree and redoes the merges from the
base commit (the result branch is only written at the end)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.ids import new_worker_id
from orchestrator.core.states import WORKER_FINAL, JobStatus, WorkerStatus
from orchestrator.db import notify as notifications
from orchestrator.db.events import record_event
from orchestrator.db.models import EngineRecord, Integration, Job, RepositoryLock, Worker, utcnow
from orchestrator.db.transitions import transition_worker
from orchestrator.engine.queries import JobRow, WorkerRow
from orchestrator.executors.local import WorkerProcess, make_dirs
from orchestrator.jobs.service import JOBS_TOPIC
from orchestrator.workspaces import merge
from orchestrator.workspaces.git import GitError

if TYPE_CHECKING:
    from orchestrator.engine.engine import Engine

log = logging.getLogger("orchestrator.engine.integrate")

PENDING, DONE, FAILED = "pending", "done", "failed"
LOCK_POLL_SECONDS = 0.05
RESOLVER_POLL_SECONDS = 0.2
RETRY_SECONDS = 2.0
MAX_ATTEMPTS = 5  # after an unexpected error (git, database): the next pass retries


@dataclass
class Source:
    branch: str
    label: str  # "job j_..." or "worker w_..."
    intent: str  # the task it was given: what a resolver reads


@dataclass
class Plan:
    repository: Path
    branch: str
    base: str
    sources: list[Source]


class Integrator:
    """Integrations this engine runs, one task per job, serialised per repository."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wanted: set[str] = set()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.temp_root = engine.settings.data_dir / "integrations"

    # ------------------------------------------------------------ settling

    async def gate(
        self, session: AsyncSession, targets: dict[str, JobStatus]
    ) -> dict[str, tuple[JobStatus, str] | None]:
        """For the jobs about to end that have a repository: None while their integration is to do
        (it is queued here), else how they end. Jobs not in the answer end as decided. A job about
        to COMPLETE gets its integration; one whose integration failed ends with its reason."""
        if not targets:
            return {}
        repos = dict(
            (await session.execute(
                select(Job.id, Job.repository).where(Job.id.in_(list(targets)), Job.repository.is_not(None))
            )).tuples().all()
        )  # fmt: skip
        if not repos:
            return {}
        rows = {
            row.job_id: row
            for row in (await session.scalars(select(Integration).where(Integration.job_id.in_(list(repos)))))
        }
        decided: dict[str, tuple[JobStatus, str] | None] = {}
        for job_id, repository in repos.items():
            row = rows.get(job_id)
            if row is None:
                if targets[job_id] != JobStatus.COMPLETED:
                    continue
                session.add(
                    Integration(
                        job_id=job_id,
                        repository=repository,
                        status=PENDING,
                        branch=merge.result_branch(job_id),
                        merged=[],
                        conflicts=[],
                        attempts=0,
                    )
                )
                self.wanted.add(job_id)
                decided[job_id] = None
            elif row.status == DONE:
                if targets[job_id] == JobStatus.COMPLETED:
                    reason = f"all workers and child jobs completed; result on {row.branch}"
                    decided[job_id] = (JobStatus.COMPLETED, reason)
            elif row.status == FAILED:
                decided[job_id] = (JobStatus.FAILED, row.reason or "integration failed")
            else:
                self.wanted.add(job_id)
                decided[job_id] = None
        return decided

    def launch(self) -> None:
        """Start the integrations settling asked for (after its transaction committed)."""
        wanted, self.wanted = self.wanted, set()
        for job_id in wanted:
            task = self.tasks.get(job_id)
            if task is None or task.done():
                self.tasks[job_id] = asyncio.create_task(self._run(job_id), name=f"integrate {job_id}")

    async def stop(self) -> None:
        tasks = [t for t in self.tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # ------------------------------------------------------------ one integration

    async def _run(self, job_id: str) -> None:
        try:
            async with self.engine.db.session() as session:
                repository = await session.scalar(
                    select(Integration.repository).where(Integration.job_id == job_id)
                )
            if repository is None:
                return
            async with self.locks.setdefault(repository, asyncio.Lock()), self._repository_lock(repository):
                await self._integrate(job_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("integration of job %s failed unexpectedly; it will be retried", job_id)
            await self._give_up_after_attempts(job_id, exc)
            await asyncio.sleep(RETRY_SECONDS)
        finally:
            self.engine.wake.set()

    async def _integrate(self, job_id: str) -> None:
        async with self.engine.db.session() as session:
            plan = await self._plan(session, job_id)
            if plan is None:
                return
        temp = self.temp_root / job_id
        repo_lock = self.engine._repo_lock(str(plan.repository))
        async with repo_lock:  # what a previous attempt (killed) may have left
            await asyncio.to_thread(merge.discard, plan.repository, temp)
        merged: list[dict[str, Any]] = []
        conflicts: list[dict[str, Any]] = []
        failure: str | None = None
        commit = plan.base
        try:
            for source in plan.sources:
                message = f"orchestrator: merge {source.branch} into {plan.branch}"
                done = await asyncio.to_thread(
                    merge.merge_in_memory, plan.repository, commit, source.branch, message
                )
                if done is not None:
                    merged.append(
                        {"branch": done.branch, "commit": done.commit, "merge_commit": done.merge_commit}
                    )
                    commit = done.merge_commit or commit
                    continue
                async with repo_lock:
                    await asyncio.to_thread(merge.prepare, plan.repository, temp, commit)
                step = await asyncio.to_thread(merge.merge, temp, source.branch, plan.branch)
                if isinstance(step, merge.Merged):  # not a conflict after all
                    resolved: dict[str, Any] = {"commit": step.merge_commit, "resolution": "clean"}
                else:
                    resolved = await self._resolve(job_id, plan, temp, source, step)
                    conflicts.append(resolved)
                if resolved["resolution"] is None:
                    failure = (
                        f"merge conflict: {', '.join(resolved['files'])} ({plan.branch} vs {source.branch})"
                    )
                    break
                merged.append(
                    {"branch": source.branch, "commit": step.commit, "merge_commit": resolved["commit"]}
                )
                commit = resolved["commit"] or commit
                async with repo_lock:
                    await asyncio.to_thread(merge.discard, plan.repository, temp)
            async with repo_lock:
                await asyncio.to_thread(merge.publish, plan.repository, plan.branch, commit)
        finally:
            async with repo_lock:
                await asyncio.to_thread(merge.discard, plan.repository, temp)
        async with self.engine.db.session() as session:
            await session.execute(
                update(Integration)
                .where(Integration.job_id == job_id, Integration.status == PENDING)
                .values(
                    status=FAILED if failure else DONE,
                    commit=commit,
                    merged=merged,
                    conflicts=conflicts,
                    reason=failure,
                    updated_at=utcnow(),
                )
            )
            record_event(
                session,
                job_id=job_id,
                kind="integration",
                actor=self.engine.actor,
                reason=failure or f"result on {plan.branch}",
                data={"branch": plan.branch, "commit": commit, "merged": merged, "conflicts": conflicts},
            )
            await notifications.notify(session, JOBS_TOPIC)

    async def _give_up_after_attempts(self, job_id: str, exc: Exception) -> None:
        """An integration that keeps failing (the repository gone, a broken ref) ends the job
        FAILED with the error rather than keeping it RUNNING for ever."""
        with contextlib.suppress(Exception):
            async with self.engine.db.session() as session:
                await session.execute(
                    update(Integration)
                    .where(
                        Integration.job_id == job_id,
                        Integration.status == PENDING,
                        Integration.attempts >= MAX_ATTEMPTS,
                    )
                    .values(status=FAILED, reason=f"integration failed: {exc}", updated_at=utcnow())
                )

    async def _resolve(
        self, job_id: str, plan: Plan, temp: Path, source: Source, conflict: merge.Conflicted
    ) -> dict[str, Any]:
        """Hand a conflict to a resolver worker of the same job (same agent profile), run in the
        temporary worktree with the merge in progress; commit the merge if it resolved it."""
        record: dict[str, Any] = {
            "branch": source.branch,
            "into": plan.branch,
            "files": conflict.files,
            "resolution": None,
            "resolver": None,
            "commit": None,
        }
        async with self.engine.db.session() as session:
            job = await session.get(Job, job_id)
            if job is None:
                return record
            agent = self.engine.agents.agents.get(job.agent)
            if agent is None or not getattr(agent, "resolver", True):
                record["reason"] = f"agent profile {job.agent!r} cannot resolve conflicts (resolver = false)"
                return record
            index = 1 + max(
                [
                    i
                    for i in await session.scalars(select(Worker.worker_index).where(Worker.job_id == job_id))
                ],
                default=-1,
            )
            worker = Worker(
                id=new_worker_id(),
                job_id=job_id,
                workspace_id=job.workspace_id,
                status=WorkerStatus.RUNNING.value,
                worker_index=index,
                depth=job.depth,
                agent=job.agent,
                holds_slot=False,
                workdir=str(temp),
                run_dir=str(self.engine.runs_dir / "pending"),
                result={"role": "resolver", "conflict": record},
                log_offset=0,
                log_lines=0,
                cost_usd=0.0,
                input_tokens=0,
                output_tokens=0,
                engine_id=self.engine.id,
                host=self.engine.executor.host,
                started_at=utcnow(),
            )
            worker.run_dir = str(self.engine.runs_dir / worker.id)
            session.add(worker)
            record_event(
                session,
                job_id=job_id,
                worker_id=worker.id,
                kind="integration.conflict",
                actor=self.engine.actor,
                reason=f"conflict in {', '.join(conflict.files)} ({plan.branch} vs {source.branch}): "
                f"resolver {worker.id} started",
                data=record,
            )
            await notifications.notify(session, JOBS_TOPIC)
            ctx = self.engine._worker_context(
                cast(WorkerRow, worker),
                cast(JobRow, job),
                temp,
                Path(worker.run_dir) / "home",
                Path(worker.run_dir),
            )
            ctx = replace(
                ctx, task=resolver_task(job.id, job.task_description, plan.branch, source, conflict.files)
            )
            worker_id = worker.id
            job_limits = job.limits
        record["resolver"] = worker_id

        def start() -> WorkerProcess:
            make_dirs(ctx.run_dir, ctx.home)
            spec = agent.launch(ctx)
            spec.env["ORCHESTRATOR_ROLE"] = "resolver"
            spec.env["ORCHESTRATOR_CONFLICT_FILES"] = json.dumps(conflict.files)
            # In the worker sandbox like any agent: it sees the temporary worktree (its git view
            # private, as a worker's) and its HOME; `merge.conclude` stages the result itself.
            return self.engine._start_process(worker_id, agent, spec, ctx, job_limits)

        try:
            proc = await asyncio.to_thread(start)
        except Exception as exc:  # the row exists: it must end, or the job would wait forever
            async with self.engine.db.session() as session:
                await transition_worker(
                    session,
                    worker_id,
                    WorkerStatus.FAILED,
                    actor=self.engine.actor,
                    reason=f"could not start: {exc}",
                )
            record["reason"] = f"resolver could not start: {exc}"
            return record
        async with self.engine.db.session() as session:
            await session.execute(
                update(Worker)
                .where(Worker.id == worker_id)
                .values(pid=proc.pid, pid_start_time=proc.start_time)
            )
        self.engine._supervise(proc, cast(JobRow, job), offset=0, lines=0)
        status = await self._wait_final(worker_id)
        if status != WorkerStatus.COMPLETED:
            record["reason"] = f"resolver {worker_id} {status}"
            return record
        commit = await asyncio.to_thread(merge.conclude, temp, conflict)
        if commit is None:
            record["reason"] = f"resolver {worker_id} left conflicts unresolved"
            return record
        record.update(resolution="resolved", commit=commit)
        return record

    async def _wait_final(self, worker_id: str) -> str:
        """The resolver's ending, as the engine records it (its exit goes the usual way)."""
        while True:
            async with self.engine.db.session() as session:
                status = await session.scalar(select(Worker.status).where(Worker.id == worker_id))
            if status is None or status in WORKER_FINAL:
                return str(status)
            await asyncio.sleep(RESOLVER_POLL_SECONDS)

    async def _plan(self, session: AsyncSession, job_id: str) -> Plan | None:
        """What to merge, and from where; None when there is nothing (left) to do."""
        row = await session.get(Integration, job_id)
        job = await session.get(Job, job_id)
        if row is None or job is None or row.status != PENDING or job.repository is None:
            return None
        repository = Path(job.repository)
        workers = list(
            await session.scalars(
                select(Worker).where(Worker.job_id == job_id).order_by(Worker.worker_index, Worker.created_at)
            )
        )
        children = list(
            await session.scalars(
                select(Job).where(Job.parent_job_id == job_id).order_by(Job.created_at, Job.id)
            )
        )
        child_rows = {
            r.job_id: r
            for r in await session.scalars(
                select(Integration).where(Integration.job_id.in_([c.id for c in children]))
            )
        }
        sources: list[Source] = []
        for child in children:
            done = child_rows.get(child.id)
            same_repository = child.repository == job.repository
            if same_repository and child.status == JobStatus.COMPLETED and done is not None:
                sources.append(Source(done.branch, f"job {child.id}", child.task_description))
        for worker in workers:
            if worker.branch and worker.status == WorkerStatus.COMPLETED:
                sources.append(Source(worker.branch, f"worker {worker.id}", job.task_description))
        base = row.base_commit
        if base is None:
            base = next(
                (w.result["base_commit"] for w in workers if w.result and w.result.get("base_commit")),
                None,
            )
        if base is None:
            base = await asyncio.to_thread(merge.ref_commit, repository, job.base_ref or "HEAD")
        if base is None:
            raise GitError(f"job {job_id}: no base commit for {job.base_ref or 'HEAD'} in {repository}")
        row.base_commit = base
        row.attempts += 1
        row.engine_id = self.engine.id
        row.updated_at = utcnow()
        return Plan(repository, row.branch, base, sources)

    # ------------------------------------------------------------ the repository lock

    @contextlib.asynccontextmanager
    async def _repository_lock(self, repository: str) -> AsyncIterator[None]:
        db = self.engine.db
        if db.is_postgres:
            key = int.from_bytes(hashlib.sha256(repository.encode()).digest()[:8], "big", signed=True)
            async with db.engine.connect() as conn:
                while True:
                    got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar()
                    await conn.commit()
                    if got:
                        break
                    await asyncio.sleep(LOCK_POLL_SECONDS)
                try:
                    yield
                finally:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await conn.commit()
            return
        # Another process holds it: nothing in this one can signal its release, so poll.
        while not await self._take_row_lock(repository):  # noqa: ASYNC110
            await asyncio.sleep(LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            async with db.session() as session:
                await session.execute(
                    delete(RepositoryLock).where(
                        RepositoryLock.repository == repository, RepositoryLock.engine_id == self.engine.id
                    )
                )

    async def _take_row_lock(self, repository: str) -> bool:
        """SQLite: every transaction holds the write lock, so read-then-write is atomic."""
        async with self.engine.db.session() as session:
            held = await session.get(RepositoryLock, repository)
            if held is not None and held.engine_id != self.engine.id:
                holder = await session.get(EngineRecord, held.engine_id)
                fresh = utcnow() - timedelta(seconds=self.engine.settings.orchestrator_engine_lease_seconds)
                if holder is not None and holder.heartbeat_at >= fresh:
                    return False
            if held is None:
                lock = RepositoryLock(repository=repository, engine_id=self.engine.id, acquired_at=utcnow())
                session.add(lock)
            else:
                held.engine_id, held.acquired_at = self.engine.id, utcnow()
        return True


def resolver_task(job_id: str, job_task: str, into: str, source: Source, files: list[str]) -> str:
    """What a resolver is asked: which branches, which files, and what each side meant to do."""
    listed = "\n".join(f"- {name}" for name in files)
    return (
        f"You are resolving a git merge conflict for job {job_id}. The working directory is a git "
        f"worktree with a merge in progress: {source.branch} ({source.label}) is being merged into "
        f"{into} (the job's result so far).\n\n"
        f"Intent of {into} (job {job_id}): {job_task}\n"
        f"Intent of {source.branch} ({source.label}): {source.intent}\n\n"
        f"Conflicted files:\n{listed}\n\n"
        "Edit each file so that it keeps the intent of both sides, remove every conflict marker "
        "(<<<<<<<, =======, >>>>>>>), and exit. Do not commit, do not run git merge --abort: "
        "the orchestrator commits the merge when you exit successfully."
    )
