"""The rate-limit governor: one backoff per provider account, shared by all its workers and engines.

When an agent's run ends with a rate limit or overload (429, 529, 5xx; the agent's `outcome` says
`retryable`), its worker does not fail: it is *parked* — it stays RUNNING and keeps its slot, its
`status_reason` says `waiting: ...` and its `result` has `waiting: true` and `retry_at` — and the
account's backoff grows (exponentially from ORCHESTRATOR_RATE_LIMIT_BACKOFF_SECONDS, capped, never
shorter than the retry-after the API asked for). Until the backoff ends no new worker of that
account starts, on any engine (the backoff is a `rate_limits` row). Then the engine restarts the
parked worker's process in place (same worker, worktree, run dir and log) with the agent's session
resumed. A run that succeeds resets the account's backoff.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.agents.base import Outcome
from orchestrator.core.config import Settings
from orchestrator.db.models import utcnow
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.queries import limits as limit_queries
from orchestrator.engine.queries import workers as worker_queries
from orchestrator.engine.queries.rows import WorkerRow

REFRESH_SECONDS = 1.0


@dataclass
class Parked:
    worker_id: str
    job_id: str
    account: str
    session_id: str | None
    retry_at: float  # monotonic


class Governor:
    def __init__(self, settings: Settings) -> None:
        self.base = settings.orchestrator_rate_limit_backoff_seconds
        self.cap = settings.orchestrator_rate_limit_max_backoff_seconds
        self.max_resumes = settings.orchestrator_rate_limit_max_resumes
        self.parked: dict[str, Parked] = {}
        self.until: dict[str, datetime] = {}  # account -> end of backoff (as last read or written)
        self.last_refresh = 0.0

    # ------------------------------------------------------------ backoff per account

    def backoff_seconds(self, failures: int, retry_after: float | None) -> float:
        exponential = min(self.cap, self.base * float(2 ** max(0, failures - 1)))
        return max(exponential, min(retry_after or 0.0, self.cap))

    async def note_limited(
        self, session: AsyncSession, account: str, retry_after: float | None, reason: str
    ) -> datetime:
        now = utcnow()
        row = await limit_queries.rate_limit(session, account)
        failures = 1 if row is None or row.until < now - timedelta(seconds=self.cap) else row.failures + 1
        until = now + timedelta(seconds=self.backoff_seconds(failures, retry_after))
        if row is not None and row.until > until:
            until = row.until  # another worker of the account already set a longer backoff
        values: dict[str, Any] = {
            "account": account,
            "until": until,
            "failures": failures,
            "reason": reason,
            "updated_at": now,
        }
        await limit_queries.save_rate_limit(session, values)
        self.until[account] = until
        return until

    async def note_ok(self, session: AsyncSession, account: str) -> None:
        if account in self.until:
            self.until.pop(account, None)
            await limit_queries.clear_rate_limit(session, account)

    async def blocked(self, session: AsyncSession, accounts: set[str]) -> set[str]:
        """Accounts (of those given) in backoff now, as any engine recorded it."""
        if not accounts:
            return set()
        if time.monotonic() - self.last_refresh >= REFRESH_SECONDS:
            self.last_refresh = time.monotonic()
            self.until = await limit_queries.rate_limits(session)
        now = utcnow()
        return {a for a in accounts if a in self.until and self.until[a] > now}

    # ------------------------------------------------------------ parked workers

    async def park(
        self,
        session: AsyncSession,
        worker: WorkerRow,
        values: dict[str, Any],
        outcome: Outcome,
        account: str,
        actor: str,
    ) -> float | None:
        """Park a rate-limited worker; returns seconds until its resume, or None if it must fail."""
        previous = worker.result or {}
        resumes = int(previous.get("resumes", 0))
        if resumes >= self.max_resumes:
            return None
        until = await self.note_limited(session, account, outcome.retry_after, outcome.reason)
        delay = max(0.0, (until - utcnow()).total_seconds())
        result = dict(values.get("result") or {})
        result.update(
            waiting=True,
            retry_at=until.isoformat(),
            waiting_reason=outcome.reason,
            resumes=resumes,
        )
        if outcome.resume_session:
            result["session_id"] = outcome.resume_session
        changes = {k: v for k, v in values.items() if k in ("commit", "diff_stat")}
        changes.update(
            result=result,
            status_reason=f"waiting: {outcome.reason}; resuming at {until.isoformat(timespec='seconds')}",
            updated_at=utcnow(),
        )
        await worker_queries.update_worker(session, worker.id, changes)
        unit_of_work(session).record_event(
            job_id=worker.job_id,
            worker_id=worker.id,
            kind="worker.waiting",
            actor=actor,
            reason=outcome.reason,
            data={"retry_at": until.isoformat(), "account": account, "resumes": resumes},
            created_at=utcnow(),
        )
        self.parked[worker.id] = Parked(
            worker.id, worker.job_id, account, outcome.resume_session, time.monotonic() + delay
        )
        return delay

    def due(self) -> list[Parked]:
        now = time.monotonic()
        return [p for p in self.parked.values() if p.retry_at <= now]

    def next_due_in(self) -> float | None:
        if not self.parked:
            return None
        return max(0.0, min(p.retry_at for p in self.parked.values()) - time.monotonic())
