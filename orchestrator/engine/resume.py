"""Resuming parked workers: a worker parked by a rate limit (engine/governor.py) is restarted in
place once its account's backoff is over: same worker, worktree, run dir and log, a new process
with the agent's session resumed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import WORKER_FINAL, WorkerStatus
from orchestrator.db.models import Job, Worker, utcnow
from orchestrator.db.topics import Topic
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.governor import Governor, Parked
from orchestrator.engine.launcher import Launcher
from orchestrator.engine.ledger import Ledger
from orchestrator.engine.queries import workers as worker_queries
from orchestrator.engine.remote_workspace import resume_worktree
from orchestrator.engine.supervision import EngineContext, Supervisor, log
from orchestrator.resources import repository as slots_repo


class Resumer:
    def __init__(
        self, ctx: EngineContext, sup: Supervisor, governor: Governor, launcher: Launcher, ledger: Ledger
    ) -> None:
        self.ctx = ctx
        self.sup = sup
        self.governor = governor
        self.launcher = launcher
        self.ledger = ledger

    async def resume_parked(self) -> None:
        """Restart the parked workers that are due (a transaction for all of them)."""
        due = self.governor.due()
        if not due:
            return
        async with self.ctx.db.session() as session:
            job_ids = list({p.job_id for p in due})
            workers = {w.id: w for w in await worker_queries.workers_for_jobs(session, job_ids)}
            jobs = await worker_queries.jobs_by_id(session, job_ids)
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
                await self._resume(session, parked, worker, job)
            await unit_of_work(session).publish(Topic.JOBS)
        if self.governor.parked:
            self.sup.wake_in(max(0.2, self.governor.next_due_in() or 0.0))

    async def _resume(self, session: AsyncSession, parked: Parked, worker: Worker, job: Job) -> None:
        run_dir = Path(worker.run_dir or self.ctx.runs_dir / worker.id)
        workdir = Path(worker.workdir or self.ctx.workspaces_dir / worker.id)
        result = dict(worker.result or {})
        for key in ("waiting", "retry_at", "waiting_reason"):
            result.pop(key, None)
        result["resumes"] = int(result.get("resumes", 0)) + 1
        try:
            agent = self.ctx.agents.get(job.agent)
            context = self.launcher.worker_context(
                worker, job, workdir, run_dir / "home", run_dir, parked.session_id
            )
            spec = agent.launch(context)
            (run_dir / "exit").unlink(missing_ok=True)
            await asyncio.to_thread(
                resume_worktree, self.ctx.executor, self.ctx.settings, job.repository, workdir, worker.branch
            )
            spawned = self.launcher.start_process(
                worker.id, agent, spec, context, job.limits, git=bool(job.repository)
            )
        except Exception as exc:
            log.warning("worker %s could not be resumed: %s", worker.id, exc)
            reason = f"could not resume after a rate limit: {exc}"
            await self.ledger.fail(session, worker, reason, values={"result": result})
            return
        proc = spawned.proc
        await worker_queries.record_resumed(
            session,
            worker.id,
            pid=proc.pid,
            start_time=proc.start_time,
            engine_id=self.ctx.id,
            host=self.ctx.executor.host,
            result=result,
            reason=f"resumed after a rate limit (resume {result['resumes']})",
        )
        unit_of_work(session).record_event(
            job_id=job.id,
            worker_id=worker.id,
            kind="worker.resumed",
            actor=self.ctx.actor,
            reason="rate-limit backoff over",
            data={"pid": proc.pid, "session_id": parked.session_id, "resumes": result["resumes"]},
            created_at=utcnow(),
        )
        self.sup.supervise(
            proc, job, offset=worker.log_offset, lines=worker.log_lines, memory_mb=spawned.memory_mb
        )
