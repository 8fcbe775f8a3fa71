"""When a row may be delivered, and when something a stream waits for may have changed.

Exactly once across concurrent writers: ids come from one autoincrement per table. On SQLite
every write transaction holds the database lock from BEGIN, so a visible id means every smaller
id is committed (or never will be). On PostgreSQL a smaller id can commit after a larger one;
rows are delivered only up to a horizon: the largest id seen in a snapshot, once every
transaction in progress at that snapshot has ended (`pg_current_snapshot()`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.streams import queries

# A PostgreSQL transaction open this long no longer holds back delivery (liveness over a stuck peer).
MAX_HORIZON_WAIT_SECONDS = 10.0
# The horizon of SQLite, where every visible id is safe to deliver.
UNBOUNDED = (2**62, 2**62)


def in_progress(snapshot: str) -> frozenset[str]:
    """The transaction ids in progress of a `pg_current_snapshot()` (xmin:xmax:xip,...)."""
    return frozenset(x for x in snapshot.split(":")[2].split(",") if x)


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
        row = await queries.change_mark(session, is_postgres)
        counters = (int(row[0]), int(row[1]), int(row[2]))
        if not is_postgres:
            return cls(counters)
        return cls(counters, in_progress(str(row[3])))

    def moved_since(self, earlier: ChangeMark) -> bool:
        """The counters changed, or a transaction in progress then has ended since."""
        return self.counters != earlier.counters or not earlier.in_progress <= self.in_progress


@dataclass(frozen=True)
class _Candidate:
    """The newest ids of a snapshot that had transactions in progress, waiting for them to end."""

    event_id: int
    log_id: int
    waiting_on: frozenset[str]
    since: float


class Horizon:
    """Largest event / log ids below which no row can still appear (see the module docstring)."""

    def __init__(self, is_postgres: bool) -> None:
        self.is_postgres = is_postgres
        self.safe = (0, 0)
        self._candidate: _Candidate | None = None

    @property
    def waiting(self) -> bool:
        """Rows are held back until transactions still open end (the change mark moves when they
        do, unless one is stuck past MAX_HORIZON_WAIT_SECONDS)."""
        return self._candidate is not None

    @property
    def waiting_on(self) -> frozenset[str]:
        """The PostgreSQL transaction ids whose end the held-back rows wait for."""
        return frozenset() if self._candidate is None else self._candidate.waiting_on

    async def update(self, session: AsyncSession) -> tuple[int, int]:
        """The horizon as of a new snapshot in `session`."""
        if not self.is_postgres:
            return UNBOUNDED
        row = await queries.newest_ids_and_snapshot(session)
        return self.advance(int(row[0]), int(row[1]), in_progress(str(row[2])), time.monotonic())

    def update_from(self, mark: ChangeMark) -> tuple[int, int]:
        """The horizon as of the snapshot a change mark was read in (the same newest ids and
        transactions in progress as `update` reads: a stream reads the mark anyway)."""
        if not self.is_postgres:
            return UNBOUNDED
        return self.advance(mark.counters[0], mark.counters[1], mark.in_progress, time.monotonic())

    def advance(self, max_event: int, max_log: int, open_now: frozenset[str], now: float) -> tuple[int, int]:
        """Move the horizon for a snapshot whose newest ids are `max_event` / `max_log` and whose
        transactions in progress are `open_now`, read at monotonic time `now`."""
        candidate = self._candidate
        if candidate is not None and (
            not (candidate.waiting_on & open_now) or now - candidate.since > MAX_HORIZON_WAIT_SECONDS
        ):
            self._raise_to(candidate.event_id, candidate.log_id)
            self._candidate = None
        if not open_now:
            self._raise_to(max_event, max_log)
            self._candidate = None
        elif self._candidate is None:
            self._candidate = _Candidate(max_event, max_log, open_now, now)
        return self.safe

    def _raise_to(self, event_id: int, log_id: int) -> None:
        self.safe = (max(self.safe[0], event_id), max(self.safe[1], log_id))
