"""All slot accounting SQL. Counters move only through guarded single-row UPDATEs, so concurrent
transactions on any number of processes can never push a depth past its quota; the CHECK
constraints on the tables are the last line of defence."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table, bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db import precompiled
from orchestrator.db.locking import for_update, is_postgres
from orchestrator.db.models import Allocation, ResourcePool, Worker, utcnow

_PG_POOLS_LOCK = 7_417_002


async def sync_pools(session: AsyncSession, quotas: list[int]) -> None:
    """Create the per-depth rows and apply the configured quotas (never below what is in use)."""
    if is_postgres(session):
        # Processes starting together (uvicorn --workers 4) would insert the same rows; one at a
        # time, released at commit. (SQLite's BEGIN IMMEDIATE serialises them already.)
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_POOLS_LOCK})
    existing = {p.depth: p for p in (await session.execute(select(ResourcePool))).scalars()}
    for depth, quota in enumerate(quotas):
        pool = existing.get(depth)
        if pool is None:
            session.add(ResourcePool(depth=depth, max_workers=quota, allocated=0))
        elif pool.max_workers != quota:
            await session.execute(
                update(ResourcePool)
                .where(ResourcePool.depth == depth, ResourcePool.allocated <= quota)
                .values(max_workers=quota)
            )
    await session.flush()


async def list_pools(session: AsyncSession, max_depth: int) -> list[ResourcePool]:
    stmt = (
        select(ResourcePool)
        .where(ResourcePool.depth <= max_depth)
        .order_by(ResourcePool.depth)
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars())


async def get_pool(session: AsyncSession, depth: int, *, lock: bool = False) -> ResourcePool | None:
    """The depth's pool; `lock`: as read until the transaction ends (after the allocations involved)."""
    stmt = select(ResourcePool).where(ResourcePool.depth == depth).execution_options(populate_existing=True)
    if lock:
        stmt = for_update(session, stmt)
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_allocation(session: AsyncSession, job_id: str, *, lock: bool = False) -> Allocation | None:
    """The job's allocation; `lock`: as read until the transaction ends (db/locking.py)."""
    stmt = select(Allocation).where(Allocation.job_id == job_id).execution_options(populate_existing=True)
    if lock:
        stmt = for_update(session, stmt)
    return (await session.execute(stmt)).scalar_one_or_none()


# The engine runs these every pass: built once, run on the driver (orchestrator.db.precompiled).
_POOL_TAKE = precompiled.Statement(
    update(ResourcePool)
    .where(
        ResourcePool.depth == bindparam("b_depth"),
        ResourcePool.allocated + bindparam("b_count") <= ResourcePool.max_workers,
    )
    .values(allocated=ResourcePool.allocated + bindparam("b_count"))
)
_POOL_GIVE_BACK = precompiled.Statement(
    update(ResourcePool)
    .where(ResourcePool.depth == bindparam("b_depth"), ResourcePool.allocated >= bindparam("b_count"))
    .values(allocated=ResourcePool.allocated - bindparam("b_count"))
)
_POOLS_FREE = select(ResourcePool.depth, ResourcePool.max_workers - ResourcePool.allocated)
_POOLS_FREE_AT = _POOLS_FREE.where(ResourcePool.depth.in_(bindparam("depths", expanding=True)))
# (all depths or some, locked or not)
_POOLS_FREE_STATEMENTS = {
    (False, False): precompiled.Statement(_POOLS_FREE),
    (False, True): precompiled.Statement(_POOLS_FREE, lock=True),
    (True, False): precompiled.Statement(_POOLS_FREE_AT),
    (True, True): precompiled.Statement(_POOLS_FREE_AT, lock=True),
}
_ALLOCATIONS_ROOM = precompiled.Statement(
    select(
        Allocation.job_id, Allocation.slots - Allocation.bound, Allocation.max_slots - Allocation.slots
    ).where(Allocation.job_id.in_(bindparam("job_ids", expanding=True))),
    lock=True,
)
_ALLOCATIONS = cast(Table, Allocation.__table__)
_ALLOCATIONS_RETURN = precompiled.Statement(
    update(_ALLOCATIONS)
    .where(_ALLOCATIONS.c.job_id == bindparam("b_job"), _ALLOCATIONS.c.bound >= bindparam("b_n"))
    .values(
        bound=_ALLOCATIONS.c.bound - bindparam("b_n"),
        slots=_ALLOCATIONS.c.slots - bindparam("b_n"),
        updated_at=bindparam("b_now"),
    )
)
_ALLOCATIONS_BIND_NEW = precompiled.Statement(
    update(_ALLOCATIONS)
    .where(
        _ALLOCATIONS.c.job_id == bindparam("b_job"),
        _ALLOCATIONS.c.slots + bindparam("b_n") <= _ALLOCATIONS.c.max_slots,
    )
    .values(
        slots=_ALLOCATIONS.c.slots + bindparam("b_n"),
        bound=_ALLOCATIONS.c.bound + bindparam("b_n"),
        updated_at=bindparam("b_now"),
    )
)
_WORKERS_RELEASE = precompiled.Statement(
    update(Worker)
    .where(Worker.id.in_(bindparam("ids", expanding=True)), Worker.holds_slot.is_(True))
    .values(holds_slot=False)
    .returning(Worker.id)
)
_WORKERS_HOLD = precompiled.Statement(
    update(Worker)
    .where(Worker.id.in_(bindparam("ids", expanding=True)), Worker.holds_slot.is_(False))
    .values(holds_slot=True)
)


async def pool_take(session: AsyncSession, depth: int, count: int) -> bool:
    return await precompiled.execute(session, _POOL_TAKE, {"b_depth": depth, "b_count": count}) == 1


async def pool_give_back(session: AsyncSession, depth: int, count: int) -> None:
    await precompiled.execute(session, _POOL_GIVE_BACK, {"b_depth": depth, "b_count": count})


async def allocation_add(session: AsyncSession, job_id: str, count: int, *, held: int) -> bool:
    """Add `count` slots to a job that holds `held` (as read): no-op if it holds any other number."""
    result = await session.execute(
        update(Allocation)
        .where(
            Allocation.job_id == job_id,
            Allocation.slots == held,
            Allocation.slots + count <= Allocation.max_slots,
        )
        .values(slots=Allocation.slots + count, updated_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def allocation_remove_unbound(session: AsyncSession, job_id: str, count: int) -> bool:
    result = await session.execute(
        update(Allocation)
        .where(Allocation.job_id == job_id, Allocation.slots - count >= Allocation.bound)
        .values(slots=Allocation.slots - count, updated_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def allocation_bind(session: AsyncSession, job_id: str) -> bool:
    """Give one already-allocated, unbound slot of the job to a worker."""
    result = await session.execute(
        update(Allocation)
        .where(Allocation.job_id == job_id, Allocation.bound + 1 <= Allocation.slots)
        .values(bound=Allocation.bound + 1, updated_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def worker_mark_holding(session: AsyncSession, worker_id: str) -> bool:
    result = await session.execute(
        update(Worker).where(Worker.id == worker_id, Worker.holds_slot.is_(False)).values(holds_slot=True)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def worker_release_slot(session: AsyncSession, worker_id: str, job_id: str, depth: int) -> bool:
    """Return a worker's slot exactly once (the holds_slot guard makes a second call a no-op)."""
    result = await session.execute(
        update(Worker).where(Worker.id == worker_id, Worker.holds_slot.is_(True)).values(holds_slot=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await session.execute(
        update(Allocation)
        .where(Allocation.job_id == job_id, Allocation.bound >= 1)
        .values(bound=Allocation.bound - 1, slots=Allocation.slots - 1, updated_at=utcnow())
    )
    await pool_give_back(session, depth, 1)
    return True


async def workers_release_slots(session: AsyncSession, workers: list[tuple[str, str, int]]) -> int:
    """`worker_release_slot` for many (worker id, job id, depth) at once: one guarded UPDATE
    decides which workers still held a slot (exactly once, as for one), then one UPDATE per job
    and one per depth return them. Same lock order: workers, allocations, pools."""
    if not workers:
        return 0
    ids = [worker_id for worker_id, _, _ in workers]
    freed = {row.id for row in await precompiled.fetch(session, _WORKERS_RELEASE, {"ids": ids})}
    per_job: dict[str, int] = {}
    per_depth: dict[int, int] = {}
    for worker_id, job_id, depth in workers:
        if worker_id in freed:
            per_job[job_id] = per_job.get(job_id, 0) + 1
            per_depth[depth] = per_depth.get(depth, 0) + 1
    if not per_job:
        return 0
    now = utcnow()
    await precompiled.execute_many(
        session,
        _ALLOCATIONS_RETURN,
        [{"b_job": job_id, "b_n": n, "b_now": now} for job_id, n in sorted(per_job.items())],
    )
    for depth, n in sorted(per_depth.items()):
        await pool_give_back(session, depth, n)
    return len(freed)


async def pools_free(
    session: AsyncSession, depths: list[int] | None, *, lock: bool = False
) -> dict[int, int]:
    """Free slots per depth (all depths: None). `lock`: as read until the transaction ends
    (db/locking.py). Lock pools only after the allocations involved, the order every slot move
    follows."""
    stmt = _POOLS_FREE_STATEMENTS[depths is not None, lock]
    rows = await precompiled.fetch(session, stmt, {"depths": depths} if depths is not None else None)
    return {depth: int(free) for depth, free in rows}


async def allocations_room(session: AsyncSession, job_ids: list[str]) -> dict[str, tuple[int, int]]:
    """(unbound slots, room for more slots) per job, locked like `pools_free`."""
    rows = await precompiled.fetch(session, _ALLOCATIONS_ROOM, {"job_ids": job_ids})
    return {job_id: (int(unbound), int(room)) for job_id, unbound, room in rows}


class SlotsMoved(RuntimeError):
    """A counter was not as read under lock: roll the transaction back (never observed)."""


async def bind_new_slots(
    session: AsyncSession, depth: int, per_job: dict[str, int], worker_ids: list[str]
) -> None:
    """Take `sum(per_job)` new slots at `depth` and bind them at once to `worker_ids`; the caller
    read the counters under lock (`pools_free`, `allocations_room`) and asks for no more than
    they allow. Guarded UPDATEs in the lock order of every slot move: allocations, pool, workers."""
    now = utcnow()
    rows = [{"b_job": job_id, "b_n": n, "b_now": now} for job_id, n in sorted(per_job.items())]
    changed = await precompiled.execute_many(session, _ALLOCATIONS_BIND_NEW, rows)
    exact = session.bind is not None and session.bind.dialect.supports_sane_multi_rowcount
    if exact and changed != len(rows):
        raise SlotsMoved("an allocation changed under lock")
    if not await pool_take(session, depth, sum(per_job.values())):
        raise SlotsMoved(f"the depth-{depth} pool changed under lock")
    if await precompiled.execute(session, _WORKERS_HOLD, {"ids": worker_ids}) != len(worker_ids):
        raise SlotsMoved("a worker took a slot under lock")
