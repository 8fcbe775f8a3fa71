"""`record_event` for callers that hold their unit of work as a plain AsyncSession (the engine,
until its rewrite is merged): a typed delegation to `UnitOfWork.record_event`. New code calls
the unit of work's method itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db.unit_of_work import unit_of_work


def record_event(
    session: AsyncSession,
    *,
    job_id: str,
    kind: str,
    actor: str,
    worker_id: str | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
    created_at: datetime | None = None,
) -> None:
    """Add an event to this unit of work; it is written when (and only if) it commits."""
    unit_of_work(session).record_event(
        job_id=job_id,
        kind=kind,
        actor=actor,
        worker_id=worker_id,
        from_status=from_status,
        to_status=to_status,
        reason=reason,
        data=data,
        created_at=created_at,
    )
