"""Server-Sent Events responses: the wire format of the streams package's feeds.

A feed yields `FeedMessage`s; here each becomes an `event:` / `id:` / `data:` frame, the response
sends a keep-alive comment every ORCHESTRATOR_SSE_PING_SECONDS (so proxies and clients can tell an
idle stream from a dead one) and asks proxies not to buffer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from orchestrator.core.config import Settings
from orchestrator.db.availability import OUTAGES
from orchestrator.db.session import Database
from orchestrator.streams.messages import FeedMessage
from orchestrator.streams.wakeups import WakeHub

SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON by default; with `follow=true`, a Server-Sent Events stream.",
    }
}

NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The last frame of a stream the database failed under: `{"detail": ...}` as a 503 would say.
UNAVAILABLE_EVENT = "unavailable"


async def _frames(messages: AsyncGenerator[FeedMessage, None]) -> AsyncIterator[ServerSentEvent]:
    # Closed with the response, so a feed leaves its wake-up hub when the client goes.
    async with contextlib.aclosing(messages):
        try:
            async for message in messages:
                yield ServerSentEvent(data=message.data, event=message.event, id=message.id)
        except Exception as exc:
            failure = OUTAGES.report(exc, "stream")
            if failure is None:
                raise
            # The database went away under an open stream: say so and end it (no traceback, one
            # log line per outage); the client resumes from its last id, after `retry` ms.
            yield ServerSentEvent(
                data=json.dumps({"detail": failure.detail}),
                event=UNAVAILABLE_EVENT,
                retry=failure.retry_after * 1000,
            )


@dataclass(frozen=True)
class Feeds:
    """What a streaming route needs from its app: the database, the app's wake-up hub (created in
    its lifespan) and the keep-alive interval."""

    db: Database
    hub: WakeHub
    ping_seconds: float

    def respond(self, messages: AsyncGenerator[FeedMessage, None]) -> EventSourceResponse:
        return EventSourceResponse(_frames(messages), ping=self.ping_seconds, headers=NO_BUFFERING)


async def get_feeds(request: Request) -> Feeds:
    settings: Settings = request.app.state.settings
    return Feeds(
        db=request.app.state.db,
        hub=request.app.state.wakeups,
        ping_seconds=settings.orchestrator_sse_ping_seconds,
    )


FeedsDep = Annotated[Feeds, Depends(get_feeds)]
