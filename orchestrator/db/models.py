"""SQLAlchemy models: the single source of truth every API process and engine shares."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

AutoId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    # On SQLite a datetime is text. The engine writes and reads thousands a second: the same
    # text as SQLAlchemy's SQLite DATETIME ("2026-11-27 12:30:15.123456", UTC), made and parsed
    # by datetime's own C methods instead of a format dict and a regular expression.
    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], str | datetime | None] | None:
        if dialect.name == "sqlite":
            return _sqlite_text
        return super().bind_processor(dialect)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], datetime | None] | None:
        if dialect.name == "sqlite":
            return _sqlite_datetime
        return super().result_processor(dialect, coltype)


def _sqlite_text(value: datetime | None) -> str | None:
    return None if value is None else _sqlite_text_of(value)


@functools.lru_cache(maxsize=256)
def _sqlite_text_of(value: datetime) -> str:
    """Cached: a transaction writes the same few instants many times (its `now`, on every row)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(" ", "microseconds")


def _sqlite_datetime(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    task_description: Mapped[str] = mapped_column(Text)
    worker_count: Mapped[int] = mapped_column(Integer)
    depth: Mapped[int] = mapped_column(Integer, index=True)
    parent_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    # "j_root/j_child/.../j_self/": a prefix match finds a whole subtree.
    path: Mapped[str] = mapped_column(String(255), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    agent: Mapped[str] = mapped_column(String(64))
    agent_options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timeout_seconds: Mapped[float | None] = mapped_column(Float)
    repository: Mapped[str | None] = mapped_column(Text)
    base_ref: Mapped[str | None] = mapped_column(Text)
    workspace_id: Mapped[str | None] = mapped_column(String(32), index=True)
    created_by: Mapped[str] = mapped_column(String(255))
    created_by_worker_id: Mapped[str | None] = mapped_column(String(32))
    engine_id: Mapped[str | None] = mapped_column(String(32), index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    max_cost_usd: Mapped[float | None] = mapped_column(Float)
    max_turns: Mapped[int | None] = mapped_column(Integer)
    # The submitter's key for this child, unique per parent: a delegating worker whose submit's
    # answer was lost (server killed, connection cut) looks the child up by it before retrying.
    delegation_key: Mapped[str | None] = mapped_column(String(128))
    # Sandbox limits asked for at submit ({"memory_mb", "pids", "network"}), checked against the profile.
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("worker_count >= 1", name="worker_count_positive"),
        CheckConstraint("depth >= 0", name="depth_non_negative"),
        Index("ux_jobs_parent_delegation_key", "parent_job_id", "delegation_key", unique=True),
        # An engine's active jobs, read every pass: without it SQLite walks all the jobs the
        # engine ever ran (ix_jobs_engine_id) and a pass slows down as history grows.
        # (depth: the engine's count of its PENDING jobs per depth is read from the index alone.)
        Index("ix_jobs_engine_status", "engine_id", "status", "depth"),
    )


# Claiming reads PENDING jobs of a depth by priority (highest first), then age: with `priority`
# descending in the index that is a walk of its first rows, not a sort of every PENDING job.
Index("ix_jobs_pending_order", Job.status, Job.depth, Job.priority.desc(), Job.created_at)
# GET /api/jobs lists newest first: a backward walk of this index, not a sort of every job.
Index("ix_jobs_created_order", Job.created_at, Job.id)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    workspace_id: Mapped[str | None] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    worker_index: Mapped[int] = mapped_column(Integer)
    depth: Mapped[int] = mapped_column(Integer)
    agent: Mapped[str] = mapped_column(String(64))
    engine_id: Mapped[str | None] = mapped_column(String(32), index=True)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    pid_start_time: Mapped[int | None] = mapped_column(BigInteger)
    holds_slot: Mapped[bool] = mapped_column(Boolean, default=False)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    status_reason: Mapped[str | None] = mapped_column(Text)
    workdir: Mapped[str | None] = mapped_column(Text)
    run_dir: Mapped[str | None] = mapped_column(Text)
    branch: Mapped[str | None] = mapped_column(Text)
    commit: Mapped[str | None] = mapped_column(String(64))
    diff_stat: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    log_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    log_lines: Mapped[int] = mapped_column(Integer, default=0)
    # What the agent reported spending, summed over its runs (a resumed worker runs several times).
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    stop_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ResourcePool(Base):
    """One row per depth; `allocated` only moves through guarded UPDATEs."""

    __tablename__ = "resource_pools"

    depth: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    max_workers: Mapped[int] = mapped_column(Integer)
    allocated: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        CheckConstraint("allocated >= 0 AND allocated <= max_workers", name="allocated_within_quota"),
    )


class Allocation(Base):
    """Slots a job holds at its depth; workers that run hold one each."""

    __tablename__ = "allocations"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    depth: Mapped[int] = mapped_column(Integer)
    slots: Mapped[int] = mapped_column(Integer, default=0)
    # Slots a live worker holds; only `slots - bound` may be released by the API.
    bound: Mapped[int] = mapped_column(Integer, default=0)
    max_slots: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        CheckConstraint("slots >= 0 AND slots <= max_slots", name="slots_within_job"),
        CheckConstraint("bound >= 0 AND bound <= slots", name="bound_within_slots"),
        # Jobs with slots no worker holds (an explicit allocation): claimed first, found
        # without walking every job's row.
        Index(
            "ix_allocations_unbound",
            "job_id",
            sqlite_where=text("slots > bound"),
            postgresql_where=text("slots > bound"),
        ),
    )


class Event(Base):
    """Append-only history: every state change (who, when, from, to, why) and agent event."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    worker_id: Mapped[str | None] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(255))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorkerLog(Base):
    __tablename__ = "worker_logs"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    worker_id: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("worker_id", "seq", name="uq_worker_logs_worker_seq"),)


class EngineRecord(Base):
    __tablename__ = "engines"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Workspace(Base):
    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    repository: Mapped[str | None] = mapped_column(Text)
    root_job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RateLimit(Base):
    """The rate-limit governor's backoff per provider account, shared by every engine."""

    __tablename__ = "rate_limits"

    account: Mapped[str] = mapped_column(String(64), primary_key=True)
    until: Mapped[datetime] = mapped_column(UTCDateTime())
    failures: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Integration(Base):
    """A job's result branch: its integration's progress, so an engine that dies mid-merge leaves a
    record the next engine redoes (the git work itself is redone from the base: it is idempotent)."""

    __tablename__ = "integrations"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    repository: Mapped[str] = mapped_column(Text, index=True)
    # pending (to do or being done) -> done | failed
    status: Mapped[str] = mapped_column(String(16), index=True)
    branch: Mapped[str] = mapped_column(Text)
    base_commit: Mapped[str | None] = mapped_column(String(64))
    commit: Mapped[str | None] = mapped_column(String(64))
    merged: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    conflicts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    engine_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RepositoryLock(Base):
    """SQLite's one-integration-per-repository lock (PostgreSQL uses an advisory lock): held by an
    engine; a dead engine's row is taken over."""

    __tablename__ = "repository_locks"

    repository: Mapped[str] = mapped_column(Text, primary_key=True)
    engine_id: Mapped[str] = mapped_column(String(32))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
