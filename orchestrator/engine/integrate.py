"""The integration phase: when every worker and child of a job in a repository has COMPLETED,
its work is merged into the job's result branch before the job may COMPLETE.

Bottom-up through the tree: a child's job settles (and integrates) first, so its parent merges the
child's result branch, then its own workers' branches, in a stable order (children by creation,
workers by index), with real merge commits (workspaces/merge.py: in memory when clean, in a
temporary worktree for a conflict, which a resolver worker gets: engine/resolver.py).

The integration's state is a row (`integrations`): `pending` until the result branch is written,
then `done` or `failed`. Settling a job reads that row: a job with a repository COMPLETES only once
its row is `done`. One integration at a time per repository across every engine process
(engine/repository_lock.py). An engine killed mid-merge leaves a `pending` row and a temporary
worktree: the engine that takes the job over removes the worktree and redoes the merges from the
base commit (the result branch is only written at the end)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import JobStatus, WorkerStatus
from orchestrator.db.availability import OUTAGES
from orchestrator.db.models import Integration, Job, Worker, utcnow
from orchestrator.db.topics import Topic
from orchestrator.engine.queries import integration as queries
from orchestrator.engine.queries.integration import DONE, FAILED
from orchestrator.engine.repository_lock import repository_lock
from orchestrator.engine.resolver import Plan, Source, resolve
from orchestrator.workspaces import merge
from orchestrator.workspaces.git import GitError

if TYPE_CHECKING:
    from orchestrator.engine.engine import Engine

log = logging.getLogger("orchestrator.engine.integrate")

RETRY_SECONDS = 2.0
MAX_ATTEMPTS = 5  # after an unexpected error (git, database): the next pass retries

Decision = tuple[JobStatus, str] | None


@dataclass
class Merges:
    """What an integration did: the result commit, each merge, each conflict, or why it failed."""

    commit: str
    merged: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None


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
        self, session: AsyncSession, targets: dict[str, JobStatus], repositories: dict[str, str] | None = None
    ) -> dict[str, Decision]:
        """For the jobs about to end that have a repository: None while their integration is to do
        (it is queued here), else how they end. Jobs not in the answer end as decided. A job about
        to COMPLETE gets its integration; one whose integration failed ends with its reason.
        `repositories`: the candidates' repositories as the caller read them (else read here)."""
        if not targets:
            return {}
        if repositories is None:
            repos = await queries.repositories_of(session, list(targets))
        else:
            repos = {job_id: repositories[job_id] for job_id in targets if job_id in repositories}
        if not repos:
            return {}
        rows = await queries.integrations_of(session, list(repos))
        decided: dict[str, Decision] = {}
        for job_id, repository in repos.items():
            row = rows.get(job_id)
            completing = targets[job_id] == JobStatus.COMPLETED
            if row is None:
                if not completing:
                    continue
                queries.add_pending(session, job_id, repository)
            if row is None or row.status not in (DONE, FAILED):
                self.wanted.add(job_id)
                decided[job_id] = None
            elif row.status == FAILED:
                decided[job_id] = (JobStatus.FAILED, row.reason or "integration failed")
            elif completing:
                decided[job_id] = (
                    JobStatus.COMPLETED,
                    f"all workers and child jobs completed; result on {row.branch}",
                )
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
        engine = self.engine
        try:
            async with engine.db.session() as session:
                repository = await queries.repository_of_integration(session, job_id)
            if repository is None:
                return
            lease = engine.settings.orchestrator_engine_lease_seconds
            async with (
                self.locks.setdefault(repository, asyncio.Lock()),
                repository_lock(engine.db, repository, engine_id=engine.id, lease_seconds=lease),
            ):
                await self._integrate(job_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A database outage is no failed attempt: one line (db/availability.py), then retry.
            if OUTAGES.report(exc, f"integration of job {job_id}") is None:
                log.exception("integration of job %s failed unexpectedly; it will be retried", job_id)
                await self._give_up_after_attempts(job_id, exc)
            await asyncio.sleep(RETRY_SECONDS)
        finally:
            engine.wake.set()

    async def _integrate(self, job_id: str) -> None:
        async with self.engine.db.session() as session:
            plan = await self._plan(session, job_id)
            if plan is None:
                return
        temp = self.temp_root / job_id
        repo_lock = self.engine.sup.repo_lock(str(plan.repository))
        async with repo_lock:  # what a previous attempt (killed) may have left
            await asyncio.to_thread(merge.discard, plan.repository, temp)
        try:
            merges = await self._merge_sources(job_id, plan, temp, repo_lock)
            async with repo_lock:
                await asyncio.to_thread(merge.publish, plan.repository, plan.branch, merges.commit)
        finally:
            async with repo_lock:
                await asyncio.to_thread(merge.discard, plan.repository, temp)
        await self._record(job_id, plan, merges)

    async def _merge_sources(self, job_id: str, plan: Plan, temp: Path, repo_lock: asyncio.Lock) -> Merges:
        """Each source merged onto the result so far: in memory when clean, else in the temporary
        worktree, where a conflict goes to a resolver; the first unresolved conflict stops it."""
        merges = Merges(commit=plan.base)
        for source in plan.sources:
            message = f"orchestrator: merge {source.branch} into {plan.branch}"
            done = await asyncio.to_thread(
                merge.merge_in_memory, plan.repository, merges.commit, source.branch, message
            )
            if done is not None:
                merges.merged.append(
                    {"branch": done.branch, "commit": done.commit, "merge_commit": done.merge_commit}
                )
                merges.commit = done.merge_commit or merges.commit
                continue
            async with repo_lock:
                await asyncio.to_thread(merge.prepare, plan.repository, temp, merges.commit)
            step = await asyncio.to_thread(merge.merge, temp, source.branch, plan.branch)
            if isinstance(step, merge.Merged):  # not a conflict after all
                resolved: dict[str, Any] = {"commit": step.merge_commit, "resolution": "clean"}
            else:
                resolved = await resolve(self.engine, job_id, plan, temp, source, step)
                merges.conflicts.append(resolved)
            if resolved["resolution"] is None:
                files = ", ".join(resolved["files"])
                merges.failure = f"merge conflict: {files} ({plan.branch} vs {source.branch})"
                return merges
            merges.merged.append(
                {"branch": source.branch, "commit": step.commit, "merge_commit": resolved["commit"]}
            )
            merges.commit = resolved["commit"] or merges.commit
            async with repo_lock:
                await asyncio.to_thread(merge.discard, plan.repository, temp)
        return merges

    async def _record(self, job_id: str, plan: Plan, merges: Merges) -> None:
        async with self.engine.db.session() as session:
            await queries.finish(
                session,
                job_id,
                commit=merges.commit,
                merged=merges.merged,
                conflicts=merges.conflicts,
                failure=merges.failure,
            )
            session.record_event(
                job_id=job_id,
                kind="integration",
                actor=self.engine.actor,
                reason=merges.failure or f"result on {plan.branch}",
                data={
                    "branch": plan.branch,
                    "commit": merges.commit,
                    "merged": merges.merged,
                    "conflicts": merges.conflicts,
                },
            )
            await session.publish(Topic.JOBS)

    async def _give_up_after_attempts(self, job_id: str, exc: Exception) -> None:
        """An integration that keeps failing (the repository gone, a broken ref) ends the job
        FAILED with the error rather than keeping it RUNNING for ever."""
        with contextlib.suppress(Exception):
            async with self.engine.db.session() as session:
                await queries.fail_after_attempts(session, job_id, MAX_ATTEMPTS, f"integration failed: {exc}")

    async def _plan(self, session: AsyncSession, job_id: str) -> Plan | None:
        """What to merge, and from where; None when there is nothing (left) to do."""
        rows = await queries.plan_rows(session, job_id)
        if rows is None:
            return None
        row, job, workers, children, child_rows = rows
        repository = Path(str(job.repository))
        sources = _sources(job, workers, children, child_rows)
        base = row.base_commit or _recorded_base(workers)
        if base is None:
            base = await asyncio.to_thread(merge.ref_commit, repository, job.base_ref or "HEAD")
        if base is None:
            raise GitError(f"job {job_id}: no base commit for {job.base_ref or 'HEAD'} in {repository}")
        row.base_commit = base
        row.attempts += 1
        row.engine_id = self.engine.id
        row.updated_at = utcnow()
        return Plan(repository, row.branch, base, sources)


def _sources(
    job: Job, workers: list[Worker], children: list[Job], child_rows: dict[str, Integration]
) -> list[Source]:
    """Completed children's result branches (same repository), then completed workers' branches."""
    sources: list[Source] = []
    for child in children:
        done = child_rows.get(child.id)
        if child.repository == job.repository and child.status == JobStatus.COMPLETED and done is not None:
            sources.append(Source(done.branch, f"job {child.id}", child.task_description))
    for worker in workers:
        if worker.branch and worker.status == WorkerStatus.COMPLETED:
            sources.append(Source(worker.branch, f"worker {worker.id}", job.task_description))
    return sources


def _recorded_base(workers: list[Worker]) -> str | None:
    """The base commit the job's workers started from, as their starts recorded it."""
    return next(
        (str(w.result["base_commit"]) for w in workers if w.result and w.result.get("base_commit")),
        None,
    )
