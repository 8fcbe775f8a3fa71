"""What a pass needs to know before it decides anything, in one read (both databases): per depth
the free slots, the engine's claimed jobs not started yet and whether an unowned job waits
there; the statuses of the workers the engine supervises (for control); and whether one of its
jobs may settle. The scheduler takes its pools from it and control its statuses (a round trip
each fewer per pass on PostgreSQL), and a pass after a blocked one reads only this to learn
whether anything that could free a slot has changed (engine.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Integer, String, and_, bindparam, exists, func, literal, null, select, union_all
from sqlalchemy import cast as sa_cast
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.states import JobStatus
from orchestrator.db import precompiled
from orchestrator.db.models import Job, ResourcePool, Worker
from orchestrator.engine.queries.rows import ACTIVE_JOB, LIVE

_PENDING = JobStatus.PENDING.value
_NO_INT = sa_cast(null(), Integer)
_NO_TEXT = sa_cast(null(), String)

_pools = select(
    literal("pool").label("kind"),
    sa_cast(ResourcePool.depth, String).label("key"),
    (ResourcePool.max_workers - ResourcePool.allocated).label("free"),
    select(func.count())
    .where(Job.engine_id == bindparam("engine_id"), Job.status == _PENDING, Job.depth == ResourcePool.depth)
    .scalar_subquery()
    .label("backlog"),
    sa_cast(
        exists().where(Job.status == _PENDING, Job.depth == ResourcePool.depth, Job.engine_id.is_(None)),
        Integer,
    ).label("waiting"),
    _NO_TEXT.label("status"),
    _NO_TEXT.label("job_status"),
)
_statuses = (
    select(
        literal("worker"), Worker.id, _NO_INT, _NO_INT, _NO_INT, Worker.status, Job.status.label("job_status")
    )
    .join(Job, Job.id == Worker.job_id)
    .where(Worker.id.in_(bindparam("live", expanding=True)))
)
# A job of this engine none of whose workers is live: settling has work (its full read locks).
_settle = select(literal("settle"), _NO_TEXT, _NO_INT, _NO_INT, _NO_INT, _NO_TEXT, _NO_TEXT).where(
    exists().where(
        Job.engine_id == bindparam("engine_id"),
        Job.status.in_(ACTIVE_JOB),
        ~exists().where(and_(Worker.job_id == Job.id, Worker.status.in_(LIVE))),
    )
)
PASS_STATE = precompiled.Statement(union_all(_pools, _statuses, _settle))


@dataclass
class PassState:
    """The pass's first read. `pools` (depth -> free, backlog, waiting) and `settle` are what a
    blocked pass compares: while they stay the same, nothing could start and nothing settle."""

    pools: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    statuses: dict[str, tuple[str, str]] = field(default_factory=dict)
    settle: bool = False

    @property
    def fingerprint(self) -> tuple[object, ...]:
        return (sorted(self.pools.items()), self.settle)

    def free(self) -> dict[int, int]:
        return {depth: free for depth, (free, _, _) in self.pools.items()}

    def backlog(self) -> dict[int, int]:
        return {depth: backlog for depth, (_, backlog, _) in self.pools.items() if backlog}

    def waiting_at(self, depths: list[int]) -> bool:
        return any(self.pools.get(depth, (0, 0, False))[2] for depth in depths)


async def pass_state(session: AsyncSession, engine_id: str, live: list[str]) -> PassState:
    state = PassState()
    params = {"engine_id": engine_id, "live": live}
    for kind, key, free, backlog, waiting, status, job_status in await precompiled.fetch(
        session, PASS_STATE, params
    ):
        if kind == "pool":
            state.pools[int(key)] = (int(free), int(backlog or 0), bool(waiting))
        elif kind == "worker":
            state.statuses[key] = (status, job_status)
        else:
            state.settle = True
    return state
