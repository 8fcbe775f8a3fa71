"""The fleet stream: every status change of every visible job and worker, for a dashboard.

`GET /api/fleet/events?follow=true` sends `event: job.status` / `event: worker.status` with an
`EventOut` plus the job's `parent_job_id`, `root_job_id` and `depth` (so a client can place a job
it has not listed yet without asking), each with `id: e<event id>-l0`. It starts at the newest
event (no replay of history) unless `Last-Event-ID` or `after_id` says where to resume, and never
ends. A worker's token sees its own subtree only. Without `follow` the same events after
`after_id` are returned as JSON. The feed itself is orchestrator/streams/fleet_feed.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response
from pydantic import BaseModel

from orchestrator.api.deps import JobsRead, SessionDep
from orchestrator.api.errors import BAD_REQUEST, ERROR_RESPONSES
from orchestrator.api.sse import SSE_RESPONSES, FeedsDep
from orchestrator.streams.cursor import MAX_ID, Cursor
from orchestrator.streams.fleet_feed import FleetEventOut, follow_fleet, read_fleet_events

router = APIRouter(prefix="/api/fleet", tags=["fleet"], responses=ERROR_RESPONSES)


class FleetEvents(BaseModel):
    events: list[FleetEventOut]
    cursor: str


@router.get("/events", response_model=FleetEvents, responses={**BAD_REQUEST, **SSE_RESPONSES})
async def fleet_events(
    actor: JobsRead,
    session: SessionDep,
    feeds: FeedsDep,
    after_id: Annotated[int | None, Query(ge=0, le=MAX_ID, description="Events with a larger id")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    follow: Annotated[bool, Query(description="Stream status changes (SSE); without, a JSON page")] = False,
    last_event_id: Annotated[str | None, Header(description="Resume a followed stream after this id")] = None,
) -> FleetEvents | Response:
    cursor = Cursor.parse_strict(last_event_id)
    if cursor is None and after_id is not None:
        cursor = Cursor(event_id=after_id)
    if follow:
        return feeds.respond(follow_fleet(feeds.db, feeds.hub, actor, cursor))
    start = cursor.event_id if cursor else 0
    events = await read_fleet_events(session, actor, start, MAX_ID, limit)
    return FleetEvents(events=events, cursor=str(Cursor(event_id=events[-1].id if events else start)))
