"""Ingest: a supervised worker's output moves from its file into the database exactly once
(the lines and the offset after them in one transaction), and what its agent says in it (its
session, last message, refused tools, final result, spend) is recorded as it comes."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.agents.base import Agent, SandboxProfile
from orchestrator.db.models import utcnow
from orchestrator.db.topics import Topic
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.queries import workers as worker_queries
from orchestrator.engine.supervision import AgentRun, EngineContext, Supervised, Supervisor


class Ingest:
    def __init__(self, ctx: EngineContext, sup: Supervisor) -> None:
        self.ctx = ctx
        self.sup = sup
        self.lock = asyncio.Lock()  # one reader per cursor at a time: the log loop and endings

    async def ingest_all(self) -> None:
        for worker_id in list(self.sup.live):
            await self.ingest(worker_id, final=False)

    async def ingest(self, worker_id: str, *, final: bool) -> None:
        """Store the worker's new complete lines (`final`: all that is left, the unterminated
        tail too, read until the file has no more)."""
        async with self.lock:
            record = self.sup.live.get(worker_id)
            if record is None:
                return
            cursor = record.cursor
            if cursor.unsure:
                await self._resync(record)
            cap = self._cap_bytes(record)
            while True:
                if cursor.offset > cap:
                    return  # cut at the cap: the rest is not read, let alone stored
                lines, new_offset = cursor.read_new(final=final, cap=cap)
                if new_offset >= cap and (size := cursor.size()) > cap:
                    # Stored in the transaction that crosses the cap: exactly once, even across
                    # an engine restart (the stored offset is then past the cap).
                    lines.append(f"[orchestrator] output cut at {cap >> 20} MiB (max_output_mb)")
                    new_offset = size
                if not lines and new_offset == cursor.offset:
                    return
                await self._store_lines(record, lines, new_offset)
                if not final:
                    return

    def _cap_bytes(self, record: Supervised) -> int:
        agent = self.ctx.agents.agents.get(record.agent)
        return (agent.sandbox.max_output_mb if agent is not None else SandboxProfile.max_output_mb) << 20

    async def _resync(self, record: Supervised) -> None:
        """Where the worker's stored output really ends, after a store whose outcome is unknown
        (a connection lost at commit): neither a line stored twice nor one skipped."""
        cursor = record.cursor
        async with self.ctx.db.read_session() as session:
            worker = (await worker_queries.workers_by_id(session, [record.proc.worker_id])).get(
                record.proc.worker_id
            )
        if worker is not None:
            cursor.offset, cursor.lines = worker.log_offset, worker.log_lines
        cursor.unsure = False

    async def _store_lines(self, record: Supervised, lines: list[str], new_offset: int) -> None:
        agent = self.ctx.agents.agents.get(record.agent)
        cursor = record.cursor
        cursor.unsure = True  # until the commit is known to have gone through
        async with self.ctx.db.session() as session:
            worker_queries.add_log_lines(session, record.proc.worker_id, record.job_id, cursor.lines, lines)
            if agent is not None:
                for line in lines:
                    await self._record_agent_events(session, agent, record, line)
            await worker_queries.advance_log(
                session, record.proc.worker_id, new_offset, cursor.lines + len(lines)
            )
            await unit_of_work(session).publish(Topic.LOGS)
        cursor.offset = new_offset
        cursor.lines += len(lines)
        cursor.unsure = False

    async def _record_agent_events(
        self, session: AsyncSession, agent: Agent, record: Supervised, line: str
    ) -> None:
        worker_id = record.proc.worker_id
        for event in agent.parse_events(line):
            note(record.run, event.kind, event.data)
            if event.kind == "result":
                await self._add_spend(session, worker_id, event.data)
            unit_of_work(session).record_event(
                job_id=record.job_id,
                worker_id=worker_id,
                kind=f"agent.{event.kind}",
                actor=f"worker:{worker_id}",
                data=event.data,
                created_at=utcnow(),
            )

    async def _add_spend(self, session: AsyncSession, worker_id: str, result: dict[str, Any]) -> None:
        """Add one run's reported cost and tokens to the worker (a resumed worker runs several times)."""
        cost, tokens_in, tokens_out = spend_of(result)
        if not (cost or tokens_in or tokens_out):
            return
        await worker_queries.add_spend(session, worker_id, cost, tokens_in, tokens_out)
        self.sup.spend_changed = True
        self.sup.wake.set()


def note(run: AgentRun, kind: str, data: dict[str, Any]) -> None:
    """Keep what an agent event says that the worker's ending needs."""
    if kind == "init" and data.get("session_id"):
        run.session_id = data["session_id"]
    elif kind == "message" and data.get("text"):
        run.last_message = data["text"]
    elif kind == "tool_refused":
        # A tool call the agent's CLI did not run: its outcome decides whether that fails the run.
        run.refused = [*(run.refused or []), data]
    elif kind == "result":
        # Agents whose final event carries only usage (Codex) still get a final message and a
        # session id (to resume) from what they said earlier in the run.
        result = dict(data)
        if run.refused is not None:
            result.setdefault("refused_tools", run.refused)
        if not result.get("result") and run.last_message:
            result["result"] = run.last_message
        if not result.get("session_id") and run.session_id:
            result["session_id"] = run.session_id
        run.result = result
    elif kind == "api_retry":
        run.api_retry = data


def spend_of(result: dict[str, Any]) -> tuple[float, int, int]:
    """(cost in USD, input tokens, output tokens) a result event reports; anything malformed is 0."""
    usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
    assert isinstance(usage, dict)

    def number(value: Any) -> float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

    cost = number(result.get("total_cost_usd"))
    tokens_in = int(
        number(usage.get("input_tokens"))
        + number(usage.get("cache_creation_input_tokens"))
        + number(usage.get("cache_read_input_tokens"))
    )
    return cost, tokens_in, int(number(usage.get("output_tokens")))
