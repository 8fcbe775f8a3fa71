"""The follow (`follow=true`) responses of the job events and worker log routes.

The routes (`GET /api/jobs/{id}/events`, `GET /api/supervisor/workers/{id}/logs`) check
visibility; here the resume point is validated (a malformed `Last-Event-ID` is a 400 before the
stream starts) and the feed of orchestrator/streams is sent as Server-Sent Events.

Job stream: `event: <kind>` (`job.status`, `worker.status`, `agent.*`) with an `EventOut`,
`event: log` with `{id, job_id, worker_id, seq, text, created_at}`, and `event: end` with
`{job_id, status}` once the tree is final and every row has been sent; every message has
`id: e<event id>-l<log id>`, the cursor after it.

Worker log stream: `event: log` with `{seq, text, created_at}` and `id: <seq>`, `event: status`
with `{worker_id, status, exit_code, status_reason}` when the status changes, and `event: end`
when the worker has ended and every line has been sent.
"""

from __future__ import annotations

from sse_starlette import EventSourceResponse

from orchestrator.api.sse import SSE_RESPONSES, Feeds
from orchestrator.db.models import Job, Worker
from orchestrator.streams.cursor import Cursor, parse_seq
from orchestrator.streams.job_feed import follow_job
from orchestrator.streams.log_feed import follow_worker_log

__all__ = ["SSE_RESPONSES", "job_event_stream", "worker_log_stream"]


def job_event_stream(feeds: Feeds, job: Job, last_event_id: str | None, after_id: int) -> EventSourceResponse:
    """The response for `follow=true`; visibility was checked by the route."""
    cursor = Cursor.parse(last_event_id, Cursor(event_id=after_id))
    return feeds.respond(follow_job(feeds.db, feeds.hub, job.id, job.path, cursor))


def worker_log_stream(
    feeds: Feeds, worker: Worker, last_event_id: str | None, offset: int
) -> EventSourceResponse:
    next_seq = parse_seq(last_event_id)
    return feeds.respond(
        follow_worker_log(feeds.db, feeds.hub, worker.id, offset if next_seq is None else next_seq)
    )
