"""Wake-ups after commit: in this process through callbacks, across processes through
PostgreSQL LISTEN/NOTIFY (delivered by the database at commit, never before)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from orchestrator.db.locking import is_postgres

CHANNEL = "orchestrator"

_listeners: list[Callable[[set[str]], None]] = []


def add_listener(callback: Callable[[set[str]], None]) -> None:
    _listeners.append(callback)


def remove_listener(callback: Callable[[set[str]], None]) -> None:
    if callback in _listeners:
        _listeners.remove(callback)


async def notify(session: AsyncSession, topic: str) -> None:
    """Announce `topic` (e.g. "jobs", "control") once this transaction commits."""
    pending: set[str] = session.sync_session.info.setdefault("notify", set())
    if topic in pending:
        return
    pending.add(topic)
    if is_postgres(session):
        await session.execute(
            text("SELECT pg_notify(:channel, :topic)"), {"channel": CHANNEL, "topic": topic}
        )


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    topics = session.info.pop("notify", None)
    if topics:
        for callback in list(_listeners):
            callback(topics)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop("notify", None)
