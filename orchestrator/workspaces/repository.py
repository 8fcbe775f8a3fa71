"""Workspace SQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import WORKER_LIVE
from orchestrator.db import counts
from orchestrator.db.locking import is_postgres
from orchestrator.db.models import Worker, Workspace


async def list_workspaces(
    session: AsyncSession, *, ids: list[str] | None, limit: int, offset: int
) -> tuple[list[tuple[Workspace, int, int]], int]:
    conditions = [Workspace.id.in_(ids)] if ids is not None else []
    total_of = select(func.count()).select_from(Workspace).where(*conditions)
    live = func.sum(case((Worker.status.in_([s.value for s in WORKER_LIVE]), 1), else_=0))
    page = (
        select(Workspace, func.count(Worker.id).label("workers"), func.coalesce(live, 0).label("live"))
        .outerjoin(Worker, Worker.workspace_id == Workspace.id)
        .where(*conditions)
        .group_by(Workspace.id)
        .order_by(*_newest_first(Workspace))
        .limit(limit)
        .offset(offset)
    )
    if is_postgres(session):  # each statement its own snapshot: the page and its total in one
        counted = (
            await session.execute(counts.counted_entities(Workspace, page, total_of, _newest_first))
        ).all()
        rows = [(ws, int(count), int(live_count)) for ws, count, live_count, _ in counted if ws is not None]
        return rows, int(counted[0][-1])
    total = (await session.execute(total_of)).scalar_one()
    rows = [
        (ws, int(count), int(live_count)) for ws, count, live_count in (await session.execute(page)).all()
    ]
    return rows, total


def _newest_first(workspace: Any) -> tuple[ColumnElement[Any], ...]:
    return (workspace.created_at.desc(), workspace.id)
