"""The fleet stream: every status change of every visible job and worker, for a dashboard.

`GET /api/fleet/events?follow=true` sends `event: job.status` / `event: worker.status` with an
`EventOut` plus the job's `parent_job_id`, `root_job_id` and `depth` (so a client can place a job
it has not listed yet without asking), each with `id: e<event id>-l0`. It starts at the newest
event (no replay of history) unless `Last-Event-ID` or `after_id` says where to resume, and never
ends. A worker's token sees its own subtree only. Without `follow` the same events after
`after_id` are returned as JSON.

It reuses the job stream's machinery (`streams.py`): the same wake-ups on commit and change
mark, and the same PostgreSQL delivery horizon, so it is exactly-once on resume as that one is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sse_starlette import EventSourceResponse, ServerSentEvent

from orchestrator.api.deps import JobsRead, SessionDep
from orchestrator.api.errors import BAD_REQUEST, ERROR_RESPONSES
from orchestrator.api.routers import streams
from orchestrator.core.auth import Actor
from orchestrator.db.models import Event, Job
from orchestrator.db.session import Database
from orchestrator.jobs.schemas import EventOut

router = APIRouter(prefix="/api/fleet", tags=["fleet"], responses=ERROR_RESPONSES)

KINDS = ("job.status", "worker.status")


class FleetEventOut(EventOut):
    parent_job_id: str | None
    root_job_id: str
    depth: int


class FleetEvents(BaseModel):
    events: list[FleetEventOut]
    cursor: str


async def _read(
    session: AsyncSession, actor: Actor, after_id: int, up_to: int, limit: int
) -> list[FleetEventOut]:
    stmt = (
        select(Event, Job.parent_job_id, Job.path, Job.depth)
        .join(Job, Job.id == Event.job_id)
        .where(Event.id > after_id, Event.id <= up_to, Event.kind.in_(KINDS))
        .order_by(Event.id)
        .limit(limit)
    )
    if actor.subtree_path is not None:
        stmt = stmt.where(Job.path.startswith(actor.subtree_path, autoescape=True))
    out = []
    for event, parent_job_id, path, depth in (await session.execute(stmt)).all():
        data: dict[str, Any] = EventOut.model_validate(event).model_dump()
        root = path.split("/", 1)[0]
        out.append(FleetEventOut(**data, parent_job_id=parent_job_id, root_job_id=root, depth=depth))
    return out


async def _newest_event_id(session: AsyncSession) -> int:
    return int((await session.execute(select(func.coalesce(func.max(Event.id), 0)))).scalar_one())


async def _follow(
    db: Database, actor: Actor, cursor: streams.Cursor | None
) -> AsyncIterator[ServerSentEvent]:
    horizon = streams.Horizon(db.is_postgres)
    with streams.wakeups(db) as waiter:
        if cursor is None:
            async with db.session() as session:
                cursor = streams.Cursor(event_id=await _newest_event_id(session))
        while True:
            waiter.event.clear()
            async with db.session() as session:
                safe_event, _ = await horizon.update(session)
                events = await _read(session, actor, cursor.event_id, safe_event, streams.BATCH)
            for event in events:
                cursor.event_id = event.id
                yield ServerSentEvent(data=event.model_dump_json(), event=event.kind, id=str(cursor))
            if len(events) < streams.BATCH:
                await streams.wait_for_change(waiter, horizon)


@router.get("/events", response_model=FleetEvents, responses={**BAD_REQUEST, **streams.SSE_RESPONSES})
async def fleet_events(
    actor: JobsRead,
    session: SessionDep,
    request: Request,
    after_id: Annotated[int | None, Query(ge=0, le=2**63 - 1, description="Events with a larger id")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    follow: Annotated[bool, Query(description="Stream status changes (SSE); without, a JSON page")] = False,
    last_event_id: Annotated[str | None, Header(description="Resume a followed stream after this id")] = None,
) -> FleetEvents | Response:
    cursor = streams.Cursor.parse_strict(last_event_id)
    if cursor is None and after_id is not None:
        cursor = streams.Cursor(event_id=after_id)
    if follow:
        return EventSourceResponse(
            _follow(request.app.state.db, actor, cursor),
            ping=streams.ping_seconds(),
            headers=streams.NO_BUFFERING,
        )
    start = cursor.event_id if cursor else 0
    events = await _read(session, actor, start, 2**63 - 1, limit)
    return FleetEvents(events=events, cursor=str(streams.Cursor(event_id=events[-1].id if events else start)))
