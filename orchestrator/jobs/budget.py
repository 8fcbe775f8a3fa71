"""Budgets over a job tree: what a subtree spent, what running children have reserved, what is left.

A job's spend is the sum of what its workers and all its descendants' workers reported
(`workers.cost_usd`, accumulated by the engine from each run's result). A child submitted with
`max_cost_usd` reserves that amount from every budgeted ancestor while it is unfinished; once it
ends only what it really spent counts (the rest is refunded). The engine stops a tree whose spend
reaches its budget (`orchestrator.engine.budget`); `check_child` refuses new children of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.errors import BadRequest
from orchestrator.core.states import JOB_FINAL, JobStatus
from orchestrator.db.locking import for_update
from orchestrator.db.models import Job, Worker


@dataclass(frozen=True)
class Usage:
    cost_usd: float
    input_tokens: int
    output_tokens: int
    workers: int
    jobs: int


async def subtree_usage(session: AsyncSession, path: str) -> Usage:
    in_tree = Job.path.startswith(path, autoescape=True)
    row = (
        await session.execute(
            select(
                func.coalesce(func.sum(Worker.cost_usd), 0.0),
                func.coalesce(func.sum(Worker.input_tokens), 0),
                func.coalesce(func.sum(Worker.output_tokens), 0),
                func.count(Worker.id),
            )
            .select_from(Worker)
            .join(Job, Job.id == Worker.job_id)
            .where(in_tree)
        )
    ).one()
    jobs = (await session.execute(select(func.count()).select_from(Job).where(in_tree))).scalar_one()
    return Usage(float(row[0]), int(row[1]), int(row[2]), int(row[3]), int(jobs))


async def reserved_by_children(session: AsyncSession, job: Job) -> float:
    """What unfinished budgeted children of `job` may still spend beyond what they have spent."""
    live = [s.value for s in JobStatus if s not in JOB_FINAL]
    children = (
        await session.execute(
            select(Job).where(
                Job.parent_job_id == job.id, Job.max_cost_usd.is_not(None), Job.status.in_(live)
            )
        )
    ).scalars()
    reserved = 0.0
    for child in children:
        assert child.max_cost_usd is not None
        spent = (await subtree_usage(session, child.path)).cost_usd
        reserved += max(0.0, child.max_cost_usd - spent)
    return reserved


async def remaining(session: AsyncSession, job: Job) -> tuple[float, float, float] | None:
    """(remaining, spent, reserved) of a budgeted job; None if it has no budget."""
    if job.max_cost_usd is None:
        return None
    spent = (await subtree_usage(session, job.path)).cost_usd
    reserved = await reserved_by_children(session, job)
    return job.max_cost_usd - spent - reserved, spent, reserved


async def check_child(session: AsyncSession, parent: Job, requested: float | None) -> None:
    """Refuse a child of `parent` when a budgeted ancestor is exhausted or cannot cover `requested`."""
    ids = [part for part in parent.path.split("/") if part]
    stmt = (
        select(Job)
        .where(Job.id.in_(ids), Job.max_cost_usd.is_not(None))
        .order_by(Job.depth.desc())
        .execution_options(populate_existing=True)
    )
    stmt = for_update(session, stmt)  # two children racing for the same budget: one waits
    ancestors = list((await session.execute(stmt)).scalars())
    for ancestor in ancestors:
        state = await remaining(session, ancestor)
        assert state is not None and ancestor.max_cost_usd is not None
        left, spent, reserved = state
        if left <= 0:
            raise BadRequest(
                f"Budget exhausted: job {ancestor.id}'s tree has spent ${spent:.4f}"
                + (f" and reserved ${reserved:.4f}" if reserved else "")
                + f" of its max_cost_usd ${ancestor.max_cost_usd:.4f}; no new child jobs may start"
            )
        if requested is not None and requested > left + 1e-12:
            raise BadRequest(
                f"max_cost_usd ${requested:.4f} exceeds the remaining budget ${left:.4f} of job "
                f"{ancestor.id} (max_cost_usd ${ancestor.max_cost_usd:.4f}, spent ${spent:.4f}, "
                f"reserved by running children ${reserved:.4f})"
            )
