"""Server-Sent Events: a job subtree's history live, and one worker's log live.

The streams read the database, never process memory, so an event that arises in any process
(another API worker, an engine on another host) is delivered. Each poll is one short
transaction; between polls the stream sleeps until a commit in this process wakes it
(`db.notify`), or a commit elsewhere moves the change mark, which one task per process reads
every poll interval (ORCHESTRATOR_SSE_POLL_SECONDS, default 0.25 s) while streams are open.

Job stream (`GET /api/jobs/{id}/events?follow=true`)
  * `event: <kind>` (`job.status`, `worker.status`, `agent.*`) with an `EventOut` as data,
  * `event: log` with `{id, job_id, worker_id, seq, text, created_at}`,
  * `event: end` with `{job_id, status}` once the root job and every descendant are final,
    their workers have ended and released their slots, and every row has been sent.
  Every message carries `id: e<event id>-l<log id>`: the cursor after that message. Sending it
  back as `Last-Event-ID` resumes after it with nothing repeated and nothing skipped.

Exactly once across concurrent writers: ids come from one autoincrement per table. On SQLite
every write transaction holds the database lock from BEGIN, so a visible id means every smaller
id is committed (or never will be). On PostgreSQL a smaller id can commit after a larger one;
rows are delivered only up to a horizon: the largest id seen in a snapshot, once every
transaction in progress at that snapshot has ended (`pg_current_snapshot()`).

Worker log stream (`GET /api/supervisor/workers/{id}/logs?follow=true`)
  * `event: log` with `{seq, text, created_at}` and `id: <seq>`,
  * `event: status` with `{worker_id, status, exit_code, status_reason}` when the status changes,
  * `event: end` when the worker has ended and every line has been sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sse_starlette import EventSourceResponse, ServerSentEvent

from orchestrator.core.config import get_settings
from orchestrator.core.errors import BadRequest
from orchestrator.core.states import JOB_FINAL, WORKER_FINAL, JobStatus, WorkerStatus
from orchestrator.db import notify
from orchestrator.db.models import Event, Job, Worker, WorkerLog
from orchestrator.db.session import Database
from orchestrator.jobs.schemas import EventOut
from orchestrator.workers import repository as workers_repo

log = logging.getLogger(__name__)

BATCH = 500
# A PostgreSQL transaction open this long no longer holds back delivery (liveness over a stuck peer).
MAX_HORIZON_WAIT_SECONDS = 10.0

SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON by default; with `follow=true`, a Server-Sent Events stream.",
    }
}


def poll_seconds() -> float:
    return get_settings().orchestrator_sse_poll_seconds


def idle_poll_seconds() -> float:
    return get_settings().orchestrator_sse_idle_poll_seconds


def ping_seconds() -> float:
    return get_settings().orchestrator_sse_ping_seconds


# --- cursors --------------------------------------------------------------------------------

# ASCII digits only (`\d` and str.isdigit also take '²' or Arabic-Indic digits, which int()
# refuses or reads), at most 18 of them: every id fits a signed 64-bit column.
_ID = r"([0-9]{1,18})"
_CURSOR = re.compile(rf"e{_ID}-l{_ID}")
_SEQ = re.compile(_ID)


def _bad_last_event_id(raw: str, expected: str) -> BadRequest:
    shown = raw if len(raw) <= 40 else raw[:40] + "..."
    return BadRequest(f"Malformed Last-Event-ID {shown!r}: expected {expected}, as sent by this stream")


@dataclass
class Cursor:
    event_id: int = 0
    log_id: int = 0

    def __str__(self) -> str:
        return f"e{self.event_id}-l{self.log_id}"

    @classmethod
    def parse(cls, raw: str | None, default: Cursor) -> Cursor:
        """The cursor of a `Last-Event-ID` (absent or blank: `default`); BadRequest if malformed,
        raised before the stream starts (a stream that has begun can only be cut short)."""
        text = (raw or "").strip()
        if not text:
            return default
        match = _CURSOR.fullmatch(text)
        if match is None:
            raise _bad_last_event_id(text, "e<event id>-l<log id>")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def parse_strict(cls, raw: str | None) -> Cursor | None:
        """None without a header; 400 for one this server never sent."""
        if raw is None or not raw.strip():
            return None
        cursor = cls.parse(raw, cls(-1, -1))
        if cursor.event_id < 0 or cursor.event_id > 2**63 - 1 or cursor.log_id > 2**63 - 1:
            raise BadRequest(f"Last-Event-ID {raw[:40]!r} is not a cursor of this stream (e<n>-l<n>)")
        return cursor


def parse_seq(raw: str | None) -> int | None:
    """The next log line to send after `Last-Event-ID: <seq>` (None when absent or blank)."""
    text = (raw or "").strip()
    if not text:
        return None
    if _SEQ.fullmatch(text) is None:
        raise _bad_last_event_id(text, "a log line number")
    return int(text) + 1


# --- wake-ups -------------------------------------------------------------------------------


class _Waiter:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def wake(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set)


class _WakeHub:
    """Wakes streams when something they may wait for has changed: at once for a commit in this
    process, and within a poll interval for a commit elsewhere (another API process, an engine on
    another host), seen as a move of the change mark. One task per database reads the mark every
    interval while streams of that database are open, so an idle stream costs nothing (each used
    to poll the database every interval: 200 idle streams kept a core busy)."""

    def __init__(self) -> None:
        self.waiters: set[_Waiter] = set()
        self.registered = False
        self.watchers: dict[Database, asyncio.Task[None]] = {}

    def _on_commit(self, _topics: set[str]) -> None:
        self.wake_all()

    def wake_all(self, db: Database | None = None) -> None:
        for waiter in list(self.waiters):
            if db is not None and waiter.db is not db:
                continue
            try:
                waiter.wake()
            except RuntimeError:  # its loop has closed
                self.waiters.discard(waiter)

    def add(self, db: Database) -> _Waiter:
        if not self.registered:
            notify.add_listener(self._on_commit)
            self.registered = True
        waiter = _Waiter(db)
        self.waiters.add(waiter)
        watcher = self.watchers.get(db)
        if watcher is None or watcher.done() or watcher.get_loop() is not waiter.loop:
            self.watchers[db] = waiter.loop.create_task(self._watch(db))
        return waiter

    def remove(self, waiter: _Waiter) -> None:
        self.waiters.discard(waiter)

    async def stop(self, db: Database) -> None:
        """At shutdown, before the database is disposed."""
        watcher = self.watchers.pop(db, None)
        if watcher is not None and watcher.get_loop() is asyncio.get_running_loop():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, db: Database) -> None:
        """Read the mark every interval while this database has streams; wake them when it moves
        (and after the first read, which has nothing to compare with)."""
        interval = poll_seconds()
        last: ChangeMark | None = None
        try:
            while any(waiter.db is db for waiter in self.waiters):
                mark: ChangeMark | None = None
                try:
                    async with db.read_session() as session:
                        mark = await ChangeMark.read(session, db.is_postgres)
                except Exception as exc:  # the streams poll and meet the error themselves
                    log.warning("reading the change mark failed: %s", exc)
                if mark is None or last is None or mark.moved_since(last):
                    self.wake_all(db)
                last = mark
                await asyncio.sleep(interval)
        finally:
            if self.watchers.get(db) is asyncio.current_task():
                del self.watchers[db]


@dataclass(frozen=True)
class ChangeMark:
    """What any stream waits for moves this mark: the newest event (every status change is one),
    the newest log line, and the slots held (a worker that ended earlier gives its slot back
    later). A slot given back in the same pass as another is taken leaves the sum as it was, but
    the start it was taken for is an event of the next pass.

    On PostgreSQL a smaller id can commit after a larger one (two engines writing log lines, say),
    which moves no maximum: the mark also holds the transactions in progress, and moves when one
    of them ends. Each stream also polls at least every ORCHESTRATOR_SSE_IDLE_POLL_SECONDS,
    whatever the mark says."""

    counters: tuple[int, int, int]
    in_progress: frozenset[str] = frozenset()

    @classmethod
    async def read(cls, session: AsyncSession, is_postgres: bool) -> ChangeMark:
        row = (await session.execute(_CHANGE_MARK_PG if is_postgres else _CHANGE_MARK)).one()
        counters = (int(row[0]), int(row[1]), int(row[2]))
        if not is_postgres:
            return cls(counters)
        return cls(counters, _in_progress(str(row[3])))

    def moved_since(self, earlier: ChangeMark) -> bool:
        """The counters changed, or a transaction in progress then has ended since."""
        return self.counters != earlier.counters or not earlier.in_progress <= self.in_progress


# The newest event id and log line id, which the change mark and the delivery horizon both read.
_NEWEST_IDS = "(SELECT coalesce(max(id), 0) FROM events), (SELECT coalesce(max(id), 0) FROM worker_logs)"
_MARK_COLUMNS = f"{_NEWEST_IDS}, (SELECT coalesce(sum(allocated), 0) FROM resource_pools)"
_CHANGE_MARK = text(f"SELECT {_MARK_COLUMNS}")
_CHANGE_MARK_PG = text(f"SELECT {_MARK_COLUMNS}, pg_current_snapshot()::text")
_HORIZON = text(f"SELECT {_NEWEST_IDS}, pg_current_snapshot()::text")


def _in_progress(snapshot: str) -> frozenset[str]:
    """The transaction ids in progress of a `pg_current_snapshot()` (xmin:xmax:xip,...)."""
    return frozenset(x for x in snapshot.split(":")[2].split(",") if x)


_hub = _WakeHub()


async def stop_watcher(db: Database) -> None:
    """Stop reading the change mark of `db` (the app's shutdown, before the database goes)."""
    await _hub.stop(db)


async def _sleep(waiter: _Waiter, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(waiter.event.wait(), seconds)


@contextlib.contextmanager
def wakeups(db: Database) -> Iterator[_Waiter]:
    """A waiter woken like the job and log streams' (for another stream, e.g. the fleet's)."""
    waiter = _hub.add(db)
    try:
        yield waiter
    finally:
        _hub.remove(waiter)


async def wait_for_change(waiter: _Waiter, horizon: Horizon) -> None:
    """Sleep until something may have changed, as the job stream does between polls."""
    idle = idle_poll_seconds()
    await _sleep(waiter, min(idle, MAX_HORIZON_WAIT_SECONDS) if horizon.waiting else idle)


# --- delivery horizon -----------------------------------------------------------------------


class Horizon:
    """Largest event / log ids below which no row can still appear (see the module docstring)."""

    def __init__(self, is_postgres: bool) -> None:
        self.is_postgres = is_postgres
        self.safe = (0, 0)
        self._candidate: tuple[int, int, frozenset[str], float] | None = None

    @property
    def waiting(self) -> bool:
        """Rows are held back until transactions still open end (the change mark moves when they
        do, unless one is stuck past MAX_HORIZON_WAIT_SECONDS)."""
        return self._candidate is not None

    async def update(self, session: AsyncSession) -> tuple[int, int]:
        if not self.is_postgres:
            return (2**62, 2**62)
        row = (await session.execute(_HORIZON)).one()
        max_event, max_log, in_progress = int(row[0]), int(row[1]), _in_progress(str(row[2]))
        now = time.monotonic()
        if self._candidate is not None:
            event_id, log_id, waiting_on, since = self._candidate
            if not (waiting_on & in_progress) or now - since > MAX_HORIZON_WAIT_SECONDS:
                self.safe = (max(self.safe[0], event_id), max(self.safe[1], log_id))
                self._candidate = None
        if not in_progress:
            self.safe = (max(self.safe[0], max_event), max(self.safe[1], max_log))
            self._candidate = None
        elif self._candidate is None:
            self._candidate = (max_event, max_log, in_progress, now)
        return self.safe


# --- the job subtree stream -----------------------------------------------------------------


def _event_message(event: Event) -> tuple[str, str]:
    return event.kind, EventOut.model_validate(event).model_dump_json()


def _log_message(line: WorkerLog) -> tuple[str, str]:
    data = {
        "id": line.id,
        "job_id": line.job_id,
        "worker_id": line.worker_id,
        "seq": line.seq,
        "text": line.text,
        "created_at": line.created_at.isoformat(),
    }
    return "log", json.dumps(data, ensure_ascii=False)


@dataclass
class _JobPoll:
    messages: list[ServerSentEvent]
    more: bool
    done: bool
    status: str


async def _poll_job(
    session: AsyncSession, root_id: str, path: str, cursor: Cursor, horizon: Horizon
) -> _JobPoll:
    safe_event, safe_log = await horizon.update(session)
    in_subtree = select(Job.id).where(Job.path.startswith(path, autoescape=True)).scalar_subquery()
    events = list(
        (
            await session.execute(
                select(Event)
                .where(Event.job_id.in_(in_subtree), Event.id > cursor.event_id, Event.id <= safe_event)
                .order_by(Event.id)
                .limit(BATCH)
            )
        ).scalars()
    )
    logs = list(
        (
            await session.execute(
                select(WorkerLog)
                .where(
                    WorkerLog.job_id.in_(in_subtree), WorkerLog.id > cursor.log_id, WorkerLog.id <= safe_log
                )
                .order_by(WorkerLog.id)
                .limit(BATCH)
            )
        ).scalars()
    )
    more = len(events) == BATCH or len(logs) == BATCH
    # Interleave the two tables by time, but keep each table in id order: timestamps come from
    # different processes and transactions, so they may disagree with ids, and the cursor must
    # only ever move forward (a resumed stream would otherwise repeat or skip rows).
    merged: Iterable[Event | WorkerLog] = heapq.merge(events, logs, key=lambda row: row.created_at)
    messages: list[ServerSentEvent] = []
    for row in merged:
        if isinstance(row, Event):
            cursor.event_id = max(cursor.event_id, row.id)
            name, data = _event_message(row)
        else:
            cursor.log_id = max(cursor.log_id, row.id)
            name, data = _log_message(row)
        messages.append(ServerSentEvent(data=data, event=name, id=str(cursor)))

    statuses = (
        await session.execute(select(Job.id, Job.status).where(Job.path.startswith(path, autoescape=True)))
    ).all()
    root_status = next((s for job_id, s in statuses if job_id == root_id), JobStatus.PENDING.value)
    done = False
    if not more and all(JobStatus(s) in JOB_FINAL for _, s in statuses):
        unfinished_workers = (
            await session.execute(
                select(func.count())
                .select_from(Worker)
                .where(
                    Worker.job_id.in_(in_subtree),
                    (Worker.status.not_in([s.value for s in WORKER_FINAL])) | Worker.holds_slot.is_(True),
                )
            )
        ).scalar_one()
        if unfinished_workers == 0:
            undelivered_events = (
                await session.execute(
                    select(func.count())
                    .select_from(Event)
                    .where(Event.job_id.in_(in_subtree), Event.id > cursor.event_id)
                )
            ).scalar_one()
            undelivered_logs = (
                await session.execute(
                    select(func.count())
                    .select_from(WorkerLog)
                    .where(WorkerLog.job_id.in_(in_subtree), WorkerLog.id > cursor.log_id)
                )
            ).scalar_one()
            done = undelivered_events == 0 and undelivered_logs == 0
    return _JobPoll(messages=messages, more=more, done=done, status=root_status)


async def follow_job(db: Database, job: Job, cursor: Cursor) -> AsyncIterator[ServerSentEvent]:
    """Everything that happens in `job`'s subtree after `cursor`, until the tree is final."""
    root_id, path = job.id, job.path
    horizon = Horizon(db.is_postgres)
    waiter = _hub.add(db)
    try:
        while True:
            waiter.event.clear()
            async with db.read_session() as session:
                poll = await _poll_job(session, root_id, path, cursor, horizon)
            for message in poll.messages:
                yield message
            if poll.done:
                data = json.dumps({"job_id": root_id, "status": poll.status})
                yield ServerSentEvent(data=data, event="end", id=str(cursor))
                return
            if not poll.more:
                # Rows held back for open transactions: the mark moves when those end, and a stuck
                # one stops holding them back after MAX_HORIZON_WAIT_SECONDS.
                await wait_for_change(waiter, horizon)
    finally:
        _hub.remove(waiter)


def job_event_stream(db: Database, job: Job, last_event_id: str | None, after_id: int) -> EventSourceResponse:
    """The response for `follow=true`; visibility was checked by the route."""
    cursor = Cursor.parse(last_event_id, Cursor(event_id=after_id))
    return EventSourceResponse(follow_job(db, job, cursor), ping=ping_seconds(), headers=NO_BUFFERING)


NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- one worker's log -----------------------------------------------------------------------


def _status_message(worker: Worker) -> ServerSentEvent:
    data = {
        "worker_id": worker.id,
        "status": worker.status,
        "exit_code": worker.exit_code,
        "status_reason": worker.status_reason,
    }
    return ServerSentEvent(data=json.dumps(data), event="status")


async def follow_worker_log(db: Database, worker_id: str, next_seq: int) -> AsyncIterator[ServerSentEvent]:
    """Lines `next_seq`, `next_seq + 1`, ... as they are stored, until the worker has ended."""
    waiter = _hub.add(db)
    last_status: str | None = None
    try:
        while True:
            waiter.event.clear()
            async with db.read_session() as session:
                worker = await workers_repo.get_worker(session, worker_id)
                if worker is None:  # deleted meanwhile (garbage collection)
                    return
                lines = await workers_repo.read_logs(session, worker_id, next_seq, BATCH)
            ended = WorkerStatus(worker.status) in WORKER_FINAL and not worker.holds_slot
            messages: list[ServerSentEvent] = []
            if worker.status != last_status:
                last_status = worker.status
                messages.append(_status_message(worker))
            for line in lines:
                # Lines of one worker are stored in order by its one engine; a hole is waited
                # for while the worker runs, and skipped once it has ended.
                if line.seq != next_seq and not ended:
                    break
                next_seq = line.seq + 1
                data = json.dumps(
                    {"seq": line.seq, "text": line.text, "created_at": line.created_at.isoformat()},
                    ensure_ascii=False,
                )
                messages.append(ServerSentEvent(data=data, event="log", id=str(line.seq)))
            for message in messages:
                yield message
            if len(lines) == BATCH and next_seq > lines[-1].seq:
                continue
            if ended and next_seq >= worker.log_lines:
                data = json.dumps({"worker_id": worker_id, "status": worker.status, "lines": next_seq})
                yield ServerSentEvent(data=data, event="end", id=str(next_seq - 1) if next_seq else None)
                return
            await _sleep(waiter, idle_poll_seconds())
    finally:
        _hub.remove(waiter)


def worker_log_stream(
    db: Database, worker: Worker, last_event_id: str | None, offset: int
) -> EventSourceResponse:
    next_seq = parse_seq(last_event_id)
    return EventSourceResponse(
        follow_worker_log(db, worker.id, offset if next_seq is None else next_seq),
        ping=ping_seconds(),
        headers=NO_BUFFERING,
    )
