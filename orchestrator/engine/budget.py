"""Budget enforcement by the engine: a tree whose reported spend reaches its max_cost_usd is stopped.

Its live workers become TERMINATED with a reason starting `budget:` (the engine then stops their
processes and commits their worktrees to their branches, as for any ended worker); its PENDING
descendants are canceled. Each engine enforces the budgets of the jobs it owns; the workers of the
tree may belong to any engine, which follows the database as usual.
"""

from __future__ import annotations

import contextlib

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.errors import InvalidTransition
from orchestrator.core.states import JOB_FINAL, WORKER_LIVE, JobStatus
from orchestrator.engine.queries import limits as limit_queries
from orchestrator.jobs import repository as jobs_repo
from orchestrator.jobs.budget import subtree_usage
from orchestrator.jobs.service import cancel_one
from orchestrator.workers import repository as workers_repo
from orchestrator.workers.service import request_stop


async def enforce(
    session: AsyncSession, engine_id: str, actor: Actor, finishing: frozenset[str] = frozenset()
) -> int:
    """Stop over-budget trees of jobs this engine owns; returns how many workers were stopped.

    `finishing`: workers that already reported their final result and are exiting by themselves;
    they end as their result says (their spend is what made the tree go over, not more work).
    """
    stopped = 0
    for job in await limit_queries.jobs_with_budget(session, engine_id):
        assert job.max_cost_usd is not None
        spent = (await subtree_usage(session, job.path)).cost_usd
        if spent < job.max_cost_usd:
            continue
        reason = (
            f"budget: the tree of job {job.id} spent ${spent:.4f} of its max_cost_usd ${job.max_cost_usd:.4f}"
        )
        for member in await jobs_repo.subtree(session, job):
            if JobStatus(member.status) in JOB_FINAL:
                continue
            if member.id != job.id and member.status == JobStatus.PENDING.value:
                await cancel_one(session, actor, member, reason=reason, strict=False)
                continue
            for worker in await workers_repo.workers_of_job(session, member.id):
                if worker.status in WORKER_LIVE and worker.id not in finishing:
                    with contextlib.suppress(InvalidTransition):
                        await request_stop(session, worker, actor, reason=reason)
                        stopped += 1
    return stopped
