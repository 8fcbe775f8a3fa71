"""`notify` for callers that hold their unit of work as a plain AsyncSession (the engine, until
its rewrite is merged): a typed delegation to `UnitOfWork.publish`. The topics, the channel and
this process's listeners live in db/topics.py."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db.topics import CHANNEL, Topic, add_listener, remove_listener
from orchestrator.db.unit_of_work import unit_of_work

__all__ = ["CHANNEL", "add_listener", "notify", "remove_listener"]


async def notify(session: AsyncSession, topic: str) -> None:
    """Announce `topic` (a `Topic`) once this unit of work commits."""
    await unit_of_work(session).publish(Topic(topic))
