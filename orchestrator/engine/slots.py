"""A pass's slot moves on PostgreSQL, netted and written by one statement at the end of the
pass (queries/postgres.py SLOT_MOVES): the slots the exits give back and the new ones the
scheduler takes, per job and per depth, and the workers that now hold one. On SQLite each move is
written when made (resources/repository.py): there a statement costs microseconds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db import precompiled
from orchestrator.db.models import utcnow
from orchestrator.db.unit_of_work import EventRow, unit_of_work
from orchestrator.engine.queries import postgres
from orchestrator.resources.repository import SlotsMoved


@dataclass
class SlotMoves:
    """Deltas to write: per job (bound, slots), per depth the pool's `allocated`, and the workers
    given a slot. `returned` / `taken` say what the pass already counts on (the scheduler adds
    what the exits gave back to the free slots it reads)."""

    jobs: dict[str, list[int]] = field(default_factory=dict)
    depths: dict[int, int] = field(default_factory=dict)
    hold: list[str] = field(default_factory=list)
    returned_at: dict[int, int] = field(default_factory=dict)
    returned_to: dict[str, int] = field(default_factory=dict)

    def give_back(self, job_id: str, depth: int) -> None:
        """A worker's slot comes back (its `holds_slot` was cleared under lock, exactly once)."""
        self._move(job_id, depth, -1, -1)
        self.returned_at[depth] = self.returned_at.get(depth, 0) + 1
        self.returned_to[job_id] = self.returned_to.get(job_id, 0) + 1

    def take_new(self, job_id: str, depth: int, worker_id: str) -> None:
        """A new slot of the depth's pool, added to the job's allocation and bound to the worker."""
        self._move(job_id, depth, 1, 1)
        self.hold.append(worker_id)

    def _move(self, job_id: str, depth: int, bound: int, slots: int) -> None:
        deltas = self.jobs.setdefault(job_id, [0, 0])
        deltas[0] += bound
        deltas[1] += slots
        self.depths[depth] = self.depths.get(depth, 0) + slots

    async def apply(self, session: AsyncSession, *, with_events: bool = False) -> None:
        """Write the netted moves (nothing if they cancel out); a guard that does not hold means a
        counter moved under lock: SlotsMoved, and the pass's transaction is rolled back.
        `with_events`: the last statement of a pass whose earlier statements wrote every row its
        events are about (so the transaction has its id, UnitOfWork._take_transaction_id): the
        events recorded so far are written by this statement, not by one more at the commit."""
        jobs = sorted((job_id, d) for job_id, d in self.jobs.items() if d != [0, 0])
        depths = sorted((depth, n) for depth, n in self.depths.items() if n)
        if not jobs and not depths and not self.hold:
            return
        work = unit_of_work(session) if with_events else None
        events = work.pending_events if work is not None else []
        params: dict[str, object] = {
            "a_jobs": [job_id for job_id, _ in jobs],
            "a_bound": [d[0] for _, d in jobs],
            "a_slots": [d[1] for _, d in jobs],
            "p_depths": [depth for depth, _ in depths],
            "p_counts": [n for _, n in depths],
            "hold": sorted(self.hold),
            "now": utcnow(),
        }
        params.update(_event_arrays(events))
        (row,) = await precompiled.fetch(session, postgres.SLOT_MOVES, params)
        expected = (len(jobs), len(depths), len(self.hold), len(events))
        if (row.allocations, row.pools, row.workers, row.events) != expected:
            raise SlotsMoved(f"slot counters moved under lock: {tuple(row)} of {expected}")
        if work is not None:
            work.pending_events = []
        self.jobs, self.depths, self.hold = {}, {}, []


def _event_arrays(events: list[EventRow]) -> dict[str, list[Any]]:
    """The events as SLOT_MOVES's arrays (`data` serialised as the JSON column would)."""
    return {
        "e_jobs": [e["job_id"] for e in events],
        "e_workers": [e["worker_id"] for e in events],
        "e_kinds": [e["kind"] for e in events],
        "e_actors": [e["actor"] for e in events],
        "e_from": [e["from_status"] for e in events],
        "e_to": [e["to_status"] for e in events],
        "e_reasons": [e["reason"] for e in events],
        "e_data": [json.dumps(e["data"]) for e in events],
        "e_at": [e["created_at"] for e in events],
    }
