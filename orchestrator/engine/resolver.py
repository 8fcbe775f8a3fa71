"""Merge conflicts handed to a resolver: a worker of the job itself (same agent profile, no slot)
run in the temporary worktree with the merge in progress, sandboxed like any worker. The merge
is committed only if the resolver exits 0 and left nothing unmerged (`merge.conclude`)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from orchestrator.agents.base import Agent, WorkerContext
from orchestrator.core.ids import new_worker_id
from orchestrator.core.states import WORKER_FINAL, WorkerStatus
from orchestrator.db.models import Job, Worker, utcnow
from orchestrator.db.topics import Topic
from orchestrator.db.transitions import transition_worker
from orchestrator.engine.queries import JobRow, WorkerRow
from orchestrator.engine.queries import integration as queries
from orchestrator.executors.local import WorkerProcess, make_dirs
from orchestrator.workspaces import merge

if TYPE_CHECKING:
    from orchestrator.engine.engine import Engine

RESOLVER_POLL_SECONDS = 0.2


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


@dataclass
class Resolver:
    """A resolver worker whose row exists, ready to start."""

    worker_id: str
    agent: Agent
    context: WorkerContext
    job: Job


async def resolve(
    engine: Engine, job_id: str, plan: Plan, temp: Path, source: Source, conflict: merge.Conflicted
) -> dict[str, Any]:
    """The conflict's record: `resolution` "resolved" and the merge `commit`, or None and why."""
    record: dict[str, Any] = {
        "branch": source.branch,
        "into": plan.branch,
        "files": conflict.files,
        "resolution": None,
        "resolver": None,
        "commit": None,
    }
    resolver = await _create(engine, job_id, plan, temp, source, conflict, record)
    if resolver is None:
        return record
    record["resolver"] = resolver.worker_id
    try:
        proc = await asyncio.to_thread(_start, engine, resolver, conflict)
    except Exception as exc:  # the row exists: it must end, or the job would wait forever
        async with engine.db.session() as session:
            await transition_worker(
                session,
                resolver.worker_id,
                WorkerStatus.FAILED,
                actor=engine.actor,
                reason=f"could not start: {exc}",
            )
        record["reason"] = f"resolver could not start: {exc}"
        return record
    async with engine.db.session() as session:
        await queries.record_pid(session, resolver.worker_id, proc.pid, proc.start_time)
    engine.sup.supervise(proc, cast(JobRow, resolver.job), offset=0, lines=0)
    status = await _wait_final(engine, resolver.worker_id)
    if status != WorkerStatus.COMPLETED:
        record["reason"] = f"resolver {resolver.worker_id} {status}"
        return record
    commit = await asyncio.to_thread(merge.conclude, temp, conflict)
    if commit is None:
        record["reason"] = f"resolver {resolver.worker_id} left conflicts unresolved"
        return record
    record.update(resolution="resolved", commit=commit)
    return record


async def _create(
    engine: Engine,
    job_id: str,
    plan: Plan,
    temp: Path,
    source: Source,
    conflict: merge.Conflicted,
    record: dict[str, Any],
) -> Resolver | None:
    """The resolver's worker row (RUNNING, no slot) and its context; None (and `record["reason"]`)
    when the job's profile cannot resolve."""
    async with engine.db.session() as session:
        job = await session.get(Job, job_id)
        if job is None:
            return None
        agent = engine.agents.agents.get(job.agent)
        if agent is None or not getattr(agent, "resolver", True):
            record["reason"] = f"agent profile {job.agent!r} cannot resolve conflicts (resolver = false)"
            return None
        worker = _resolver_row(engine, job, temp, await queries.next_worker_index(session, job_id), record)
        session.add(worker)
        session.record_event(
            job_id=job_id,
            worker_id=worker.id,
            kind="integration.conflict",
            actor=engine.actor,
            reason=f"conflict in {', '.join(conflict.files)} ({plan.branch} vs {source.branch}): "
            f"resolver {worker.id} started",
            data=record,
        )
        await session.publish(Topic.JOBS)
        run_dir = engine.runs_dir / worker.id
        context = engine.launcher.worker_context(
            cast(WorkerRow, worker), cast(JobRow, job), temp, run_dir / "home", run_dir
        )
        task = resolver_task(job.id, job.task_description, plan.branch, source, conflict.files)
        return Resolver(worker.id, agent, replace(context, task=task), job)


def _resolver_row(engine: Engine, job: Job, temp: Path, index: int, record: dict[str, Any]) -> Worker:
    worker_id = new_worker_id()
    return Worker(
        id=worker_id,
        job_id=job.id,
        workspace_id=job.workspace_id,
        status=WorkerStatus.RUNNING.value,
        worker_index=index,
        depth=job.depth,
        agent=job.agent,
        holds_slot=False,
        workdir=str(temp),
        run_dir=str(engine.runs_dir / worker_id),
        result={"role": "resolver", "conflict": record},
        log_offset=0,
        log_lines=0,
        cost_usd=0.0,
        input_tokens=0,
        output_tokens=0,
        engine_id=engine.id,
        host=engine.executor.host,
        started_at=utcnow(),
    )


def _start(engine: Engine, resolver: Resolver, conflict: merge.Conflicted) -> WorkerProcess:
    """In the worker sandbox like any agent: it sees the temporary worktree (its git view private,
    as a worker's) and its HOME; `merge.conclude` stages the result itself."""
    ctx = resolver.context
    make_dirs(ctx.run_dir, ctx.home)
    spec = resolver.agent.launch(ctx)
    spec.env["ORCHESTRATOR_ROLE"] = "resolver"
    spec.env["ORCHESTRATOR_CONFLICT_FILES"] = json.dumps(conflict.files)
    return engine.launcher.start_process(
        resolver.worker_id, resolver.agent, spec, ctx, resolver.job.limits
    ).proc


async def _wait_final(engine: Engine, worker_id: str) -> str:
    """The resolver's ending, as the engine records it (its exit goes the usual way)."""
    while True:
        async with engine.db.session() as session:
            status = await queries.worker_status(session, worker_id)
        if status is None or status in WORKER_FINAL:
            return str(status)
        await asyncio.sleep(RESOLVER_POLL_SECONDS)


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
