"""Units of work: the session a service or engine phase holds, whose commit visibly does all a
write does: write the events recorded, commit, then announce the topics published.

`UnitOfWork` is the session of `Database.session()`; `ReadSession` the session of
`Database.read_session()`, which refuses every write. Both are AsyncSessions, so repositories
take either as `AsyncSession`; a function that records events or publishes topics takes a
`UnitOfWork`, so its type says it writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from sqlalchemy import bindparam, insert, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from orchestrator.db import precompiled
from orchestrator.db.models import Event, WorkerLog, utcnow
from orchestrator.db.precompiled import ReadOnlySessionError
from orchestrator.db.topics import CHANNEL, Topic, announce

__all__ = ["EventRow", "ReadOnlySessionError", "ReadSession", "Topic", "UnitOfWork", "unit_of_work"]


class EventRow(TypedDict):
    """An event row waiting for its transaction's commit."""

    job_id: str
    worker_id: str | None
    kind: str
    actor: str
    from_status: str | None
    to_status: str | None
    reason: str | None
    data: dict[str, Any] | None
    created_at: datetime


# Events need no identity in memory: one multi-row INSERT at commit instead of an ORM INSERT each
# (SQLite cannot hand back a batch of generated ids in order).
_INSERT_EVENTS = precompiled.Statement(
    insert(Event).values({name: bindparam(name) for name in EventRow.__annotations__})
)
_NOTIFY = text("SELECT pg_notify(:channel, :topic)")
_TAKE_TRANSACTION_ID = "SELECT pg_current_xact_id()"


class _Session(precompiled.StatementSession):
    """What both kinds share: bulk UPDATE/DELETE without evaluating their criteria against
    objects in memory. Every read here uses populate_existing, so in-memory copies are never
    trusted; the default ("auto": evaluate in Python, else fetch) cost more CPU than the
    statements themselves."""

    if not TYPE_CHECKING:  # the same signatures as AsyncSession's (its overloads keep row types)

        async def execute(self, statement, params=None, **kw):
            return await super().execute(statement, params, **self._options(statement, kw))

        async def scalar(self, statement, params=None, **kw):
            return await super().scalar(statement, params, **self._options(statement, kw))

    def _options(self, statement: Any, kw: dict[str, Any]) -> dict[str, Any]:
        if getattr(statement, "is_dml", False):
            self._refuse("run " + statement.__class__.__name__)
            options = dict(kw.get("execution_options") or {})
            options.setdefault("synchronize_session", False)
            kw["execution_options"] = options
        return kw

    def _refuse(self, what: str) -> None:
        """A read session raises here; a unit of work may write."""


class ReadSession(_Session):
    """One read-only transaction (a consistent snapshot). Any write raises ReadOnlySessionError:
    a statement that writes, an object added or changed, and (having no such methods) events or
    topics, which mypy refuses already."""

    read_only: ClassVar[bool] = True

    def _refuse(self, what: str) -> None:
        raise ReadOnlySessionError(f"a read session cannot {what}")

    async def flush(self, objects: Any = None) -> None:
        self._refuse_changes()
        await super().flush(objects)

    async def commit(self) -> None:
        self._refuse_changes()
        await super().commit()

    def _refuse_changes(self) -> None:
        if self.new or self.dirty or self.deleted:
            self._refuse("write rows")


class UnitOfWork(_Session):
    """A transaction that may write. `record_event` and `publish` collect what the commit does;
    `commit()` writes the events, commits, then announces the topics; a rollback drops both."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending_events: list[EventRow] = []
        self.topics: set[Topic] = set()
        # PostgreSQL: this transaction has its id (see _take_transaction_id).
        self.has_transaction_id = False

    def record_event(
        self,
        *,
        job_id: str,
        kind: str,
        actor: str,
        worker_id: str | None = None,
        from_status: str | None = None,
        to_status: str | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
        created_at: datetime | None = None,
    ) -> None:
        """Add an event to this transaction; it is written when (and only if) it commits."""
        self.pending_events.append(
            EventRow(
                job_id=job_id,
                worker_id=worker_id,
                kind=kind,
                actor=actor,
                from_status=from_status,
                to_status=to_status,
                reason=reason,
                data=data,
                created_at=created_at or utcnow(),
            )
        )

    async def publish(self, topic: Topic) -> None:
        """Announce `topic` once this transaction commits (PostgreSQL's NOTIFY is delivered at
        commit too, to every process listening on CHANNEL)."""
        if topic in self.topics:
            return
        self.topics.add(topic)
        if self._is_postgres:
            await self.execute(_NOTIFY, {"channel": CHANNEL, "topic": topic.value})

    def published_by_statement(self, topic: Topic) -> None:
        """A statement of this transaction wrote rows and either ran pg_notify for `topic` itself
        or leaves the NOTIFY to its caller after the commit (the group commit's
        `Database.notify_committed`), so the commit announces it here without a NOTIFY, and the
        transaction has its id."""
        self.topics.add(topic)
        self.has_transaction_id = True

    async def flush(self, objects: Any = None) -> None:
        await self._take_transaction_id(ordered_rows=any(isinstance(o, Event | WorkerLog) for o in self.new))
        await super().flush(objects)

    async def commit(self) -> None:
        """Write the recorded events, commit, then announce the published topics."""
        events, topics, has_transaction_id = self.pending_events, self.topics, self.has_transaction_id
        self._forget()
        self.sqlite_driver = None
        # The writes and the commit in one call into SQLAlchemy's synchronous session: one
        # switch from the event loop for both, as a plain commit costs.
        await self.run_sync(_write_and_commit, events, has_transaction_id)
        announce(topics)

    async def rollback(self) -> None:
        self._forget()
        await super().rollback()

    async def close(self) -> None:
        self._forget()
        await super().close()

    def _forget(self) -> None:
        self.pending_events, self.topics, self.has_transaction_id = [], set(), False

    @property
    def _is_postgres(self) -> bool:
        return self.bind is not None and self.bind.dialect.name == "postgresql"

    async def _take_transaction_id(self, *, ordered_rows: bool) -> None:
        """On PostgreSQL, take a transaction id before inserting events or log lines.

        Their ids come from sequences (nextval), and PostgreSQL assigns a transaction id only at
        the first write. Without this, a reader's snapshot taken between nextval and that
        assignment would not list the writer as in progress, and the live streams (which
        deliver ids only up to a horizon past every in-progress transaction) could skip the row
        for good.
        """
        if not ordered_rows or self.has_transaction_id or not self._is_postgres:
            return
        await (await self.connection()).exec_driver_sql(_TAKE_TRANSACTION_ID)
        self.has_transaction_id = True


def _write_and_commit(session: Session, events: list[EventRow], has_transaction_id: bool) -> None:
    """The commit of a unit of work: its events (one multi-row INSERT), after taking a
    transaction id first on PostgreSQL (see UnitOfWork._take_transaction_id), then COMMIT."""
    if events or any(isinstance(o, Event | WorkerLog) for o in session.new):
        connection = session.connection()
        if connection.dialect.name == "postgresql" and not has_transaction_id:
            connection.exec_driver_sql(_TAKE_TRANSACTION_ID)
        precompiled.execute_many_sync(connection, _INSERT_EVENTS, events)
    session.commit()


def unit_of_work(session: AsyncSession) -> UnitOfWork:
    """`session` as the unit of work it must be (for callers typed with a plain AsyncSession)."""
    if isinstance(session, UnitOfWork):
        return session
    if isinstance(session, ReadSession):
        raise ReadOnlySessionError("a read session cannot record events or publish topics")
    raise TypeError(f"{type(session).__name__} is not a unit of work: open one with Database.session()")
