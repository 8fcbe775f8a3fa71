"""Every status change of every job and worker an actor may see, for a dashboard.

Each `job.status` / `worker.status` event carries its job's `parent_job_id`, `root_job_id` and
`depth`, so a client can place a job it has not listed yet without asking. It uses the job feed's
machinery: the same wake-ups and the same PostgreSQL delivery horizon, so it is exactly-once on
resume as that one is.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.auth import Actor
from orchestrator.db.session import Database
from orchestrator.jobs.schemas import EventOut
from orchestrator.streams import queries
from orchestrator.streams.cursor import Cursor
from orchestrator.streams.horizon import ChangeMark, Horizon
from orchestrator.streams.messages import BATCH, FeedMessage
from orchestrator.streams.wakeups import WakeHub

KINDS = ("job.status", "worker.status")


class FleetEventOut(EventOut):
    parent_job_id: str | None
    root_job_id: str
    depth: int


async def read_fleet_events(
    session: AsyncSession, actor: Actor, after_id: int, up_to: int, limit: int
) -> list[FleetEventOut]:
    """The status events after `after_id` (up to `up_to`) of the jobs `actor` may see."""
    rows = await queries.status_events(session, KINDS, actor.subtree_path, after_id, up_to, limit)
    out = []
    for event, parent_job_id, path, depth in rows:
        data: dict[str, Any] = EventOut.model_validate(event).model_dump()
        root = path.split("/", 1)[0]
        out.append(FleetEventOut(**data, parent_job_id=parent_job_id, root_job_id=root, depth=depth))
    return out


async def follow_fleet(
    db: Database, hub: WakeHub, actor: Actor, cursor: Cursor | None
) -> AsyncGenerator[FeedMessage, None]:
    """Status events after `cursor` (None: from the newest event on, no replay), never ending."""
    horizon = Horizon(db.is_postgres)
    with hub.subscribe() as wakeup:
        if cursor is None:
            async with db.read_session() as session:
                cursor = Cursor(event_id=await queries.newest_event_id(session))
        while True:
            wakeup.clear()
            async with db.read_session() as session:
                wakeup.seen = await ChangeMark.read(session, db.is_postgres)
                safe_event, _ = horizon.update_from(wakeup.seen)
                events = await read_fleet_events(session, actor, cursor.event_id, safe_event, BATCH)
            for event in events:
                cursor.event_id = event.id
                yield FeedMessage(event.kind, event.model_dump_json(), str(cursor))
            if len(events) < BATCH:
                await wakeup.wait(horizon_waiting=horizon.waiting)
