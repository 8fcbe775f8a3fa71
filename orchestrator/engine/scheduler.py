"""The scheduler: claims unowned PENDING jobs (as many as the free slots can start soon), makes
their IDLE workers, and gives IDLE workers slots in queue order, holding back those whose
provider account is in a rate-limit backoff and those the host has no memory for."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.engine.governor import Governor
from orchestrator.engine.queries import batches, claims
from orchestrator.engine.queries import workers as worker_queries
from orchestrator.engine.queries.rows import JobRow, WorkerRow
from orchestrator.engine.queries.state import PassState, pass_state
from orchestrator.engine.slots import SlotMoves
from orchestrator.engine.supervision import IDLE_SLACK, START_BATCH, EngineContext, Supervisor, worker_limits
from orchestrator.executors.cgroups import host_available_mb
from orchestrator.resources import repository as slots_repo
from orchestrator.resources.service import bind_unbound_slot

Ready = list[tuple[WorkerRow, JobRow]]


class Scheduler:
    def __init__(self, ctx: EngineContext, sup: Supervisor, governor: Governor) -> None:
        self.ctx = ctx
        self.sup = sup
        self.governor = governor
        self.memory_waits: dict[str, str] = {}  # IDLE workers held by memory-aware admission
        # The last pass started nothing while jobs waited at a depth whose quota was full: until a
        # slot comes back, passes woken by other processes' commits (each submit) find the same.
        self.blocked = False
        self._full_depths: list[int] = []
        self._idle_found = False
        # PostgreSQL: the pass's first read (pools, backlog, control's statuses), one statement.
        self.state: PassState | None = None
        # A blocked pass that found no IDLE worker to hold back: what it read, which the next
        # passes compare instead of running in full (engine.py); None: run in full.
        self.blocked_fingerprint: tuple[object, ...] | None = None

    async def schedule(self, session: AsyncSession, moves: SlotMoves | None = None) -> Ready:
        """Claim PENDING jobs, create their workers, and give IDLE workers slots (in the pass's
        transaction); returns the workers to start, at most START_BATCH. `moves` (PostgreSQL):
        the pass's slot moves (the exits' returns among them), written at its end; without it,
        the new slots are written here. Notes whether the pass was `blocked`."""
        self._full_depths, self._idle_found, self.state = [], False, None
        ready = await self._schedule(session, moves)
        full = self._full_depths
        self.blocked = not ready and bool(full) and await self._waiting_at(session, full)
        self.blocked_fingerprint = None
        if self.blocked and not self._idle_found:
            if self.state is None:  # SQLite: its separate reads cost microseconds; one more here
                self.state = await pass_state(session, self.ctx.id, list(self.sup.live))
            self.blocked_fingerprint = self.state.fingerprint
        return ready

    async def _waiting_at(self, session: AsyncSession, full: list[int]) -> bool:
        if self.state is not None:
            return self.state.waiting_at(full)
        return await claims.waiting_at(session, full)

    async def _schedule(self, session: AsyncSession, moves: SlotMoves | None) -> Ready:
        postgres = self.ctx.db.is_postgres
        if postgres:
            self.state = await pass_state(session, self.ctx.id, list(self.sup.live))
            free, backlog = self.state.free(), self.state.backlog()
            for depth, count in (moves.returned_at if moves is not None else {}).items():
                free[depth] = free.get(depth, 0) + count
        else:
            free = await slots_repo.pools_free(session, None)
        self._full_depths = [depth for depth, count in free.items() if count <= 0]
        per_depth = {
            depth: min(count, START_BATCH) + IDLE_SLACK for depth, count in free.items() if count > 0
        }
        if not postgres:
            backlog = await claims.owned_pending_by_depth(session, self.ctx.id)
        room = {depth: count - backlog.get(depth, 0) for depth, count in per_depth.items()}
        # Only jobs nobody owned are claimed, and workers are made only here: none has any yet.
        if postgres:  # the claim and the workers, one statement
            await batches.claim(session, self.ctx.id, room, claims.CLAIM_ALLOCATED, self.ctx.actor)
        else:
            claimed = await claims.claim_pending(session, self.ctx.id, room)
            await claims.create_workers(session, claimed, self.ctx.actor)
        idle = await claims.idle_workers(session, self.ctx.id, per_depth, START_BATCH * 4)
        self._idle_found = bool(idle)
        if not idle or not self.ctx.executor.can_start():
            return []
        if not postgres:
            return await self.bind_slots(session, idle, free)
        at_once = moves if moves is not None else SlotMoves()
        ready = await self.bind_slots(session, idle, free, at_once)
        if moves is None:
            await at_once.apply(session)
        return ready

    async def bind_slots(
        self, session: AsyncSession, idle: Ready, free: dict[int, int], moves: SlotMoves | None = None
    ) -> Ready:
        """Give slots to IDLE workers in queue order, at most START_BATCH: a slot they hold
        already, else an unbound one of their job (an explicit allocation), else a new one from
        their depth's pool. The counters are read under lock, so the new slots of the whole pass
        are taken with one UPDATE per job and one per depth (PostgreSQL: `moves`, one statement
        for the pass, the exits' returns netted in)."""
        limited = await self.rate_limited_agents(session, {job.agent for _, job in idle})
        if moves is not None:
            room, free = await self._locked_room(session, idle, moves)
        else:
            room = await slots_repo.allocations_room(session, list({job.id for _, job in idle}))
        ready: Ready = []
        new_slots: dict[int, tuple[dict[str, int], list[str]]] = {}
        admit = _MemoryAdmission(self.ctx, self.memory_room())
        for worker, job in idle:
            if len(ready) >= START_BATCH:
                break
            if worker.id in self.sup.live or job.agent in limited or not admit(worker, job):
                continue
            if worker.holds_slot:
                ready.append((worker, job))
                continue
            unbound, more = room.get(job.id, (0, 0))
            if unbound > 0:
                if await bind_unbound_slot(session, worker.id, job.id):
                    ready.append((worker, job))
                    room[job.id] = (unbound - 1, more)
                continue
            if more > 0 and free.get(job.depth, 0) > 0:
                if moves is not None:
                    moves.take_new(job.id, job.depth, worker.id)
                else:
                    per_job, worker_ids = new_slots.setdefault(job.depth, ({}, []))
                    per_job[job.id] = per_job.get(job.id, 0) + 1
                    worker_ids.append(worker.id)
                room[job.id] = (0, more - 1)
                free[job.depth] -= 1
                ready.append((worker, job))
        for depth, (per_job, worker_ids) in sorted(new_slots.items()):
            await slots_repo.bind_new_slots(session, depth, per_job, worker_ids)
        await self._note_memory_waits(session, admit.waiting)
        return ready

    async def _locked_room(
        self, session: AsyncSession, idle: Ready, moves: SlotMoves
    ) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
        """PostgreSQL: the counters new slots are taken against, locked in one statement (the
        allocations of the jobs returning slots too: every allocation before any pool), with
        the pass's returns, not written yet, added."""
        job_ids = sorted({job.id for _, job in idle} | set(moves.returned_to))
        depths = sorted({job.depth for _, job in idle} | set(moves.returned_at))
        room, free = await batches.room(session, job_ids, depths)
        for job_id, count in moves.returned_to.items():
            unbound, more = room.get(job_id, (0, 0))
            room[job_id] = (unbound, more + count)
        for depth, count in moves.returned_at.items():
            free[depth] = free.get(depth, 0) + count
        return room, free

    def memory_room(self) -> int | None:
        """MiB a new worker may still reserve: the host's available memory minus the limits of
        the workers running (or just launched), which may grow to them; None without limits."""
        if self.ctx.executor.cgroups is None:
            return None
        available = host_available_mb(self.ctx.settings.orchestrator_meminfo_path)
        if available is None:
            return None
        return available - self.sup.reserved_memory_mb()

    async def _note_memory_waits(self, session: AsyncSession, waiting: dict[str, str]) -> None:
        """Say why IDLE workers wait for memory (once per change of the reason)."""
        for worker_id, reason in waiting.items():
            if self.memory_waits.get(worker_id) != reason:
                await worker_queries.note_waiting(session, worker_id, reason)
        self.memory_waits = waiting

    async def rate_limited_agents(self, session: AsyncSession, names: set[str]) -> set[str]:
        """Agents whose provider account is in a rate-limit backoff: their new workers wait."""
        accounts: dict[str, str] = {}
        for name in names:
            key = self.ctx.account_of(name)
            if key is not None:
                accounts[name] = key
        blocked = await self.governor.blocked(session, set(accounts.values()))
        return {name for name, key in accounts.items() if key in blocked}


class _MemoryAdmission:
    """Memory-aware admission over one pass: a worker starts only if its memory limit and the
    headroom fit in what is left (None: no limits on this host, every worker fits)."""

    def __init__(self, ctx: EngineContext, room: int | None) -> None:
        self.ctx = ctx
        self.room = room
        self.place = ctx.executor.placement()  # a cluster: some node must have room (Ray)
        self.waiting: dict[str, str] = {}

    def __call__(self, worker: WorkerRow, job: JobRow) -> bool:
        if self.room is None and self.place is None:
            return True
        agent = self.ctx.agents.agents.get(job.agent)
        needs = worker_limits(agent, job.limits).memory_mb if agent is not None else 0
        if self.place is not None:
            reason = self.place(needs or None)
            if reason is not None:
                self.waiting[worker.id] = reason
                return False
        if self.room is None:
            return True
        if needs + self.ctx.settings.orchestrator_memory_headroom_mb > self.room:
            self.waiting[worker.id] = f"waiting for memory: needs {needs} MiB, {max(self.room, 0)} available"
            return False
        self.room -= needs
        return True
