"""Reading a job by id, for every domain package: workers, resources and workspaces check a
job's subtree and status too, and they sit below `orchestrator.jobs`, so the lookup lives here
rather than in the jobs repository they must not import."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.core.errors import Forbidden, NotFound
from orchestrator.core.ids import has_nul
from orchestrator.db.models import Job


async def get_job(session: AsyncSession, job_id: str) -> Job | None:
    if has_nul(job_id):
        return None
    stmt = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_visible_job(session: AsyncSession, actor: Actor, job_id: str) -> Job:
    job = await get_job(session, job_id)
    check_visible(actor, job_id, job.path if job is not None else None)
    assert job is not None  # checked
    return job


def check_visible(actor: Actor, job_id: str, path: str | None) -> None:
    """NotFound for a job that is not there (`path` None), Forbidden for one outside the actor's
    subtree: the refusals of every read of a job by id."""
    if path is None:
        raise NotFound(f"Job {job_id} not found")
    if not actor.can_see(path):
        raise Forbidden(f"Job {job_id} is outside this token's job subtree")
