"""The limits the engine enforces across engines: rate-limit backoffs per provider account (one
row each, shared by every engine) and the jobs with a budget."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db.locking import is_postgres
from orchestrator.db.models import Job, RateLimit
from orchestrator.engine.queries.rows import ACTIVE_JOB


async def rate_limit(session: AsyncSession, account: str) -> RateLimit | None:
    return await session.get(RateLimit, account, populate_existing=True)


async def save_rate_limit(session: AsyncSession, values: dict[str, Any]) -> None:
    """Insert or replace the backoff of `values["account"]` (one statement: engines race)."""
    insert = pg_insert(RateLimit) if is_postgres(session) else sqlite_insert(RateLimit)
    stmt = insert.values(**values).on_conflict_do_update(
        index_elements=[RateLimit.account],
        set_={k: v for k, v in values.items() if k != "account"},
    )
    await session.execute(stmt)


async def clear_rate_limit(session: AsyncSession, account: str) -> None:
    await session.execute(delete(RateLimit).where(RateLimit.account == account))


async def rate_limits(session: AsyncSession) -> dict[str, datetime]:
    """The end of each account's backoff, as any engine recorded it."""
    rows = (await session.execute(select(RateLimit.account, RateLimit.until))).all()
    return {account: until for account, until in rows}


async def jobs_with_budget(session: AsyncSession, engine_id: str) -> list[Job]:
    """The engine's active jobs that have a max_cost_usd (whole rows, read afresh)."""
    stmt = (
        select(Job)
        .where(Job.engine_id == engine_id, Job.status.in_(ACTIVE_JOB), Job.max_cost_usd.is_not(None))
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars())
