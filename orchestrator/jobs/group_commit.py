"""Group commit of submits: the submits a process receives while its previous transaction is
being written go out together, in one transaction, written by one task.

A transaction of its own per submit costs more than the submit's rows: a session, BEGIN, the
event INSERT, COMMIT, and on PostgreSQL a round trip for each (issue 19). One transaction for
the submits that queued meanwhile writes their rows with one statement per table and commits
once; under load the batches grow by themselves, and a lone submit is written at once.

Each submit still gets its own answer:

* a submit refused by a check (a DomainError: parent not found, key taken, budget exhausted...)
  is refused before it adds anything (jobs/submit.py), so the others go on in the transaction;
* any other error while writing (a unique index refusing a key that another process took, a
  deadlock, a lost connection) rolls the shared transaction back, and each of its submits is
  then written again in a transaction of its own, as if they had never been grouped: a submit
  that fails then fails alone, the others are written;
* a failed COMMIT is every submit's answer: it may have been committed (a lost connection), so
  none is written again (the client's retry finds it by its delegation_key).

Quotas and keys stay exact: the submits of a transaction run one after another, and one that
reads rows (a child's parent, keys and budget; a repository's workspace) sees every earlier one
of the transaction (jobs/submit_rows.py). On PostgreSQL a transaction holds the children of at
most one parent (the rest wait for the next): a child locks its tree and its budgeted ancestors,
and two transactions each holding one tree and waiting for the other's would deadlock.

On PostgreSQL the next batch does not wait for the previous COMMIT (issue 19): a batch whose
rows are written hands the queue to a new writer before it commits, so the submits that queued
meanwhile are written while the COMMIT (its events, the WAL flush) is in flight, on a
connection of their own. At most `PIPELINE` transactions of a process are in flight, and one
writer at a time takes and writes rows; each submit is still in exactly one batch and
answered once. Two such transactions are two writers, as two processes' are: a child's tree
lock orders them (a batch waits for the committing one to end, which waits on nothing). On
SQLite (one writer at a time) batches follow one another, each taken when the process's turn
to write has come (`Database.write_turn`), not before waiting for it.

On PostgreSQL the submits' transactions carry no NOTIFY: the other processes (an engine
listening) are told by one sent after the commit, one at a time per process
(`Database.notify_committed`), so the commits of several processes are flushed together.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError

from orchestrator.core.config import Settings
from orchestrator.core.errors import DomainError
from orchestrator.db.precompiled import Record
from orchestrator.db.session import Database
from orchestrator.db.topics import Topic, announce
from orchestrator.jobs.submit import (
    AgentValidator,
    Draft,
    LimitsValidator,
    is_plain_root,
    plain_root_job,
    write,
)
from orchestrator.jobs.submit_rows import PendingRows, submitted_job, write_plain_roots

log = logging.getLogger(__name__)

# Submits in one transaction at most: a batch runs in the event loop (SQLite runs inline), so
# it bounds the time other requests of the process wait for it.
MAX_BATCH = 64
# PostgreSQL: a process's transactions in flight at once, one writing rows, one committing.
PIPELINE = 2


@dataclass
class _Waiting:
    draft: Draft
    answer: asyncio.Future[Record] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SubmitQueue:
    """The submits of one process's `Database` waiting for their transaction, and the task that
    writes them (started when one arrives, gone when none waits). It holds the app's settings
    and agent checks too, so a submit request needs nothing else (each dependency FastAPI
    solves costs CPU on the API's hottest route)."""

    def __init__(
        self,
        database: Database,
        settings: Settings,
        validate_agent: AgentValidator,
        validate_limits: LimitsValidator | None = None,
    ) -> None:
        self.database = database
        self.settings = settings
        self.validate_agent = validate_agent
        self.validate_limits = validate_limits
        self._waiting: deque[_Waiting] = deque()
        self._writers: set[asyncio.Task[None]] = set()
        self._taker: asyncio.Task[None] | None = None  # the writer taking and writing rows
        self._pipeline = PIPELINE if database.is_postgres else 1
        self.transactions = 0  # written, for tests and benchmarks: how much grouping happened

    async def submit(self, draft: Draft) -> Record:
        """Write `draft` and return its job once committed; raise what it was refused with."""
        waiting = _Waiting(draft)
        self._waiting.append(waiting)
        self._wake()
        # A request cancelled here cancels its answer: not written yet, it is dropped.
        return await waiting.answer

    def _wake(self) -> None:
        """A writer for the waiting submits, unless one is taking rows already or `PIPELINE`
        transactions are in flight (the first to commit then goes on with them)."""
        if self._taker is None and self._waiting and len(self._writers) < self._pipeline:
            writer = asyncio.create_task(self._write_waiting(), name="submit-writer")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
            self._taker = writer

    def _committing(self) -> None:
        """The current batch's rows are written, its COMMIT is next: the next batch may begin."""
        if self._taker is asyncio.current_task():
            self._taker = None
            self._wake()

    async def _write_waiting(self) -> None:
        me = asyncio.current_task()
        try:
            while self._taker is me:
                # SQLite: the batch is taken once this process's turn to write has come, so the
                # submits that arrived while another process wrote go in it too (with several
                # processes, batches taken before the wait were each a few submits long).
                async with self.database.write_turn():
                    batch = self._take()
                    if batch:
                        await self._write(batch)
                        self._committing()
                if not batch and self._taker is me:
                    self._taker = None
                if self._taker is None and self._waiting:
                    self._taker = me  # committed, and no writer took the submits queued meanwhile
        except BaseException:  # cancelled (shutdown): the submits still waiting are not written
            for waiting in self._waiting:
                waiting.answer.cancel()
            self._waiting.clear()
            raise
        finally:
            if self._taker is me:
                self._taker = None

    def _take(self) -> list[_Waiting]:
        """The next batch, in order of arrival; on PostgreSQL children of one parent only."""
        batch: list[_Waiting] = []
        later: list[_Waiting] = []
        parent: str | None = None
        one_tree = self.database.is_postgres
        while self._waiting and len(batch) < MAX_BATCH:
            waiting = self._waiting.popleft()
            if waiting.answer.done():  # its request was cancelled
                continue
            child_of = waiting.draft.body.parent_job_id
            if one_tree and child_of is not None:
                if parent is not None and child_of != parent:
                    later.append(waiting)
                    continue
                parent = child_of
            batch.append(waiting)
        self._waiting.extendleft(reversed(later))
        return batch

    async def _write(self, batch: list[_Waiting]) -> None:
        try:
            if (len(batch) == 1 and not self._plain_roots(batch)) or not await self._write_together(batch):
                for waiting in batch:
                    await self._write_alone(waiting)
        except BaseException:  # cancelled (shutdown) mid-batch: its unanswered submits too
            for waiting in batch:
                waiting.answer.cancel()  # a no-op for those answered
            raise

    async def _write_together(self, batch: list[_Waiting]) -> bool:
        """Write the batch in one transaction and answer each; False if it was rolled back
        before its COMMIT (nothing written, nobody answered)."""
        if self._plain_roots(batch):
            return await self._write_plain_roots(batch)
        answers: list[Record | DomainError] = []
        writing = True
        try:
            async with self.database.session() as session:
                rows = PendingRows(session, notify=False)
                for waiting in batch:
                    try:
                        answers.append(await write(rows, waiting.draft))
                    except DomainError as refused:  # refused before it added anything
                        answers.append(refused)
                await rows.flush()
                writing = False
                self._committing()
        except Exception as error:
            if writing:
                log.info(
                    "a group commit of %d submits rolled back (%s): each is written alone", len(batch), error
                )
                return False
            for waiting, answer in zip(batch, answers, strict=True):
                _answer(waiting, answer if isinstance(answer, DomainError) else error)
            return True
        self._committed()
        for waiting, answer in zip(batch, answers, strict=True):
            _answer(waiting, answer)
        return True

    def _plain_roots(self, batch: list[_Waiting]) -> bool:
        return self.database.is_postgres and all(is_plain_root(waiting.draft) for waiting in batch)

    async def _write_plain_roots(self, batch: list[_Waiting]) -> bool:
        """PostgreSQL, root jobs that need no reads: one statement in autocommit, one round trip
        instead of BEGIN, rows, events and COMMIT; False if the server refused it (nothing
        written, nobody answered)."""
        jobs = [plain_root_job(waiting.draft) for waiting in batch]
        sent = False
        try:
            async with self.database.autocommit_connection() as connection:
                self._committing()  # the statement is its own COMMIT: the next batch may begin
                sent = True
                await write_plain_roots(
                    connection, [(job, w.draft.actor.name) for job, w in zip(jobs, batch, strict=True)]
                )
        except Exception as error:
            if not sent or _refused_by_server(error):  # nothing written: each is written alone
                log.info(
                    "a group commit of %d submits was not written (%s): each is written alone",
                    len(batch),
                    error,
                )
                return False
            for waiting in batch:  # it may have been committed: none is written again
                _answer(waiting, error)
            return True
        announce({Topic.JOBS})
        self._committed()
        for waiting, job in zip(batch, jobs, strict=True):
            _answer(waiting, submitted_job(job))
        return True

    def _committed(self) -> None:
        """A transaction of submits committed: the other processes are told after it, not by a
        NOTIFY in it (Database.notify_committed says why)."""
        self.transactions += 1
        self.database.notify_committed(Topic.JOBS)

    async def _write_alone(self, waiting: _Waiting) -> None:
        if waiting.answer.done():
            return
        try:
            async with self.database.session() as session:
                rows = PendingRows(session, notify=False)
                job = await write(rows, waiting.draft)
                await rows.flush()
                self._committing()
        except Exception as error:
            _answer(waiting, error)
            return
        self._committed()
        _answer(waiting, job)


def _refused_by_server(error: Exception) -> bool:
    """The server answered the statement with an error (a constraint, a trigger, a deadlock): its
    transaction was rolled back. Not a lost connection (SQLSTATE class 08) or a server shutting
    down (57P): then the statement may have committed."""
    sqlstate = getattr(error.orig, "sqlstate", None) if isinstance(error, DBAPIError) else None
    return isinstance(sqlstate, str) and not sqlstate.startswith(("08", "57P"))


def _answer(waiting: _Waiting, answer: Record | Exception) -> None:
    if waiting.answer.done():  # its request was cancelled meanwhile
        return
    if isinstance(answer, Exception):
        waiting.answer.set_exception(answer)
    else:
        waiting.answer.set_result(answer)
