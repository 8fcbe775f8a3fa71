"""Workspaces group the workers that share a repository (or, without one, a root job's tree)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.db.models import Job
from orchestrator.workspaces import repository as repo
from orchestrator.workspaces.schemas import WorkspaceOut


async def list_workspaces(
    session: AsyncSession, actor: Actor, *, limit: int, offset: int
) -> tuple[list[WorkspaceOut], int]:
    ids = None
    if actor.subtree_path is not None:
        stmt = (
            select(Job.workspace_id)
            .where(Job.path.startswith(actor.subtree_path, autoescape=True))
            .distinct()
        )
        ids = [i for i in (await session.execute(stmt)).scalars() if i]
    rows, total = await repo.list_workspaces(session, ids=ids, limit=limit, offset=offset)
    return [
        WorkspaceOut(
            id=ws.id,
            repository=ws.repository,
            root_job_id=ws.root_job_id,
            created_at=ws.created_at,
            workers=count,
            live_workers=live,
        )
        for ws, count, live in rows
    ], total
