"""Event rows (the append-only history) are written in one multi-row INSERT per transaction.

Through the ORM each event would be its own INSERT (SQLite cannot hand back a batch of generated
ids in order); events need no identity in memory, so they are collected as plain rows and written
with one executemany just before the transaction commits.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, event, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from orchestrator.db import fast
from orchestrator.db.models import Event, utcnow

_PENDING = "pending_events"
_COLUMNS = (
    "job_id",
    "worker_id",
    "kind",
    "actor",
    "from_status",
    "to_status",
    "reason",
    "data",
    "created_at",
)
_INSERT_EVENTS = fast.FastStatement(insert(Event).values({name: bindparam(name) for name in _COLUMNS}))


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
    """Add an event to this transaction; it is written when (and only if) the transaction commits."""
    session.sync_session.info.setdefault(_PENDING, []).append(
        {
            "job_id": job_id,
            "worker_id": worker_id,
            "kind": kind,
            "actor": actor,
            "from_status": from_status,
            "to_status": to_status,
            "reason": reason,
            "data": data,
            "created_at": created_at or utcnow(),
        }
    )


@event.listens_for(Session, "before_commit")
def _write_pending_events(session: Session) -> None:
    rows = session.info.pop(_PENDING, None)
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql" and not session.info.get("has_xid"):
        # Take a transaction id before the sequence values: see db/session.py (live streams).
        connection.exec_driver_sql("SELECT pg_current_xact_id()")
    fast.execute_many_sync(connection, _INSERT_EVENTS, rows)


@event.listens_for(Session, "after_rollback")
def _drop_pending_events(session: Session) -> None:
    session.info.pop(_PENDING, None)
