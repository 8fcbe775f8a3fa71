"""A job subtree's history live: its events and log lines, in order, until the tree is final.

Every message carries the cursor after it as its id (`e<event id>-l<log id>`); resuming from it
repeats nothing and skips nothing, because rows are read in id order per table and only up to
the delivery horizon (see horizon.py).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import JOB_FINAL, JobStatus
from orchestrator.db.models import Event, WorkerLog
from orchestrator.db.session import Database
from orchestrator.jobs.schemas import EventOut
from orchestrator.streams import queries
from orchestrator.streams.cursor import Cursor
from orchestrator.streams.horizon import ChangeMark, Horizon
from orchestrator.streams.messages import BATCH, FeedMessage
from orchestrator.streams.wakeups import Subscription, WakeHub


def _event_message(event: Event, cursor: Cursor) -> FeedMessage:
    return FeedMessage(event.kind, EventOut.model_validate(event).model_dump_json(), str(cursor))


def _log_message(line: WorkerLog, cursor: Cursor) -> FeedMessage:
    data = {
        "id": line.id,
        "job_id": line.job_id,
        "worker_id": line.worker_id,
        "seq": line.seq,
        "text": line.text,
        "created_at": line.created_at.isoformat(),
    }
    return FeedMessage("log", json.dumps(data, ensure_ascii=False), str(cursor))


def _interleave(events: list[Event], logs: list[WorkerLog], cursor: Cursor) -> list[FeedMessage]:
    """Both tables' rows by time, moving `cursor` past each.

    Each table stays in id order: timestamps come from different processes and transactions, so
    they may disagree with ids, and the cursor must only ever move forward (a resumed stream
    would otherwise repeat or skip rows)."""
    merged: Iterable[Event | WorkerLog] = heapq.merge(events, logs, key=lambda row: row.created_at)
    messages: list[FeedMessage] = []
    for row in merged:
        if isinstance(row, Event):
            cursor.event_id = max(cursor.event_id, row.id)
            messages.append(_event_message(row, cursor))
        else:
            cursor.log_id = max(cursor.log_id, row.id)
            messages.append(_log_message(row, cursor))
    return messages


@dataclass
class _JobPoll:
    messages: list[FeedMessage]
    more: bool
    done: bool
    status: str


async def _tree_done(session: AsyncSession, path: str, statuses: Iterable[str], cursor: Cursor) -> bool:
    """Every job final, every worker ended with its slot given back, and every row sent."""
    if not all(JobStatus(s) in JOB_FINAL for s in statuses):
        return False
    if await queries.subtree_unfinished_workers(session, path) != 0:
        return False
    return await queries.subtree_rows_after(session, path, cursor.event_id, cursor.log_id) == 0


async def _poll_job(
    session: AsyncSession, root_id: str, path: str, cursor: Cursor, horizon: Horizon, wakeup: Subscription
) -> _JobPoll:
    wakeup.seen = await ChangeMark.read(session, horizon.is_postgres)
    safe_event, safe_log = horizon.update_from(wakeup.seen)
    events = await queries.subtree_events(session, path, cursor.event_id, safe_event, BATCH)
    logs = await queries.subtree_logs(session, path, cursor.log_id, safe_log, BATCH)
    more = len(events) == BATCH or len(logs) == BATCH
    messages = _interleave(events, logs, cursor)
    statuses = await queries.subtree_statuses(session, path)
    root_status = next((s for job_id, s in statuses if job_id == root_id), JobStatus.PENDING.value)
    done = not more and await _tree_done(session, path, (s for _, s in statuses), cursor)
    return _JobPoll(messages=messages, more=more, done=done, status=root_status)


async def follow_job(
    db: Database, hub: WakeHub, root_id: str, path: str, cursor: Cursor
) -> AsyncGenerator[FeedMessage, None]:
    """Everything that happens in the subtree of job `root_id` (at `path`) after `cursor`, then
    `end` with `{job_id, status}` once the tree is final; visibility is the caller's to check."""
    horizon = Horizon(db.is_postgres)
    with hub.subscribe() as wakeup:
        while True:
            wakeup.clear()
            async with db.read_session() as session:
                poll = await _poll_job(session, root_id, path, cursor, horizon, wakeup)
            for message in poll.messages:
                yield message
            if poll.done:
                yield FeedMessage("end", json.dumps({"job_id": root_id, "status": poll.status}), str(cursor))
                return
            if not poll.more:
                # Rows held back for open transactions: the mark moves when those end, and a stuck
                # one stops holding them back after MAX_HORIZON_WAIT_SECONDS.
                await wakeup.wait(horizon_waiting=horizon.waiting)
