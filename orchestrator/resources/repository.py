"""All slot accounting SQL. Counters move only through guarded single-row UPDATEs, so concurrent
transactions on any number of processes can never push a depth past its quota; the CHECK
constraints on the tables are the last line of defence."""

from __future__ import annotations

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db.models import Allocation, ResourcePool, Worker, utcnow

_PG_POOLS_LOCK = 7_417_002


async def sync_pools(session: AsyncSession, quotas: list[int]) -> None:
    """Create the per-depth rows and apply the configured quotas (never below what is in use)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
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


async def get_pool(session: AsyncSession, depth: int) -> ResourcePool | None:
    stmt = select(ResourcePool).where(ResourcePool.depth == depth).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_allocation(session: AsyncSession, job_id: str) -> Allocation | None:
    stmt = select(Allocation).where(Allocation.job_id == job_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def pool_take(session: AsyncSession, depth: int, count: int) -> bool:
    result = await session.execute(
        update(ResourcePool)
        .where(ResourcePool.depth == depth, ResourcePool.allocated + count <= ResourcePool.max_workers)
        .values(allocated=ResourcePool.allocated + count)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def pool_give_back(session: AsyncSession, depth: int, count: int) -> None:
    await session.execute(
        update(ResourcePool)
        .where(ResourcePool.depth == depth, ResourcePool.allocated >= count)
        .values(allocated=ResourcePool.allocated - count)
    )


async def allocation_add(session: AsyncSession, job_id: str, count: int) -> bool:
    result = await session.execute(
        update(Allocation)
        .where(Allocation.job_id == job_id, Allocation.slots + count <= Allocation.max_slots)
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


async def allocation_add_bound(session: AsyncSession, job_id: str, add: int) -> bool:
    """Add (or, with add=-1, undo) one slot that is bound to a worker at once."""
    guard = Allocation.slots + add <= Allocation.max_slots if add > 0 else Allocation.bound + add >= 0
    result = await session.execute(
        update(Allocation)
        .where(Allocation.job_id == job_id, guard)
        .values(slots=Allocation.slots + add, bound=Allocation.bound + add, updated_at=utcnow())
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
