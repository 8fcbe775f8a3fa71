"""Workspace SQL."""

from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import WORKER_LIVE
from orchestrator.db.models import Worker, Workspace


async def list_workspaces(
    session: AsyncSession, *, ids: list[str] | None, limit: int, offset: int
) -> tuple[list[tuple[Workspace, int, int]], int]:
    conditions = [Workspace.id.in_(ids)] if ids is not None else []
    total = (
        await session.execute(select(func.count()).select_from(Workspace).where(*conditions))
    ).scalar_one()
    live = func.sum(case((Worker.status.in_([s.value for s in WORKER_LIVE]), 1), else_=0))
    stmt = (
        select(Workspace, func.count(Worker.id), func.coalesce(live, 0))
        .outerjoin(Worker, Worker.workspace_id == Workspace.id)
        .where(*conditions)
        .group_by(Workspace.id)
        .order_by(Workspace.created_at.desc(), Workspace.id)
        .limit(limit)
        .offset(offset)
    )
    rows = [
        (ws, int(count), int(live_count)) for ws, count, live_count in (await session.execute(stmt)).all()
    ]
    return rows, total
