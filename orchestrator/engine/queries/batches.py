"""Running PostgreSQL's merged statements (queries/postgres.py) and turning their rows into what
the ledger and the scheduler use, the shapes SQLite's separate reads give them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.db import precompiled
from orchestrator.db.models import utcnow
from orchestrator.db.topics import CHANNEL, Topic
from orchestrator.db.unit_of_work import unit_of_work
from orchestrator.engine.queries import postgres
from orchestrator.engine.queries.claims import record_worker_created
from orchestrator.engine.queries.rows import SettlingJob, WorkerEnding


class Settling:
    """What settling reads, from one statement: the candidate jobs (locked), and per job its
    workers' endings, its children's statuses, its unbound slots and its repository."""

    def __init__(self, rows: list[Any]) -> None:
        self.jobs: list[SettlingJob] = rows
        self.workers: dict[str, list[WorkerEnding]] = {}
        self.children: dict[str, list[tuple[str, str]]] = {}
        self.unbound: dict[str, int] = {}
        self.repositories: dict[str, str] = {}
        for row in rows:
            self.workers[row.id] = [WorkerEnding(*w) for w in row.workers or []]
            self.children[row.id] = [(child, status) for child, status in row.children or []]
            if row.unbound:
                self.unbound[row.id] = int(row.unbound)
            if row.repository is not None:
                self.repositories[row.id] = row.repository


async def settling(session: AsyncSession, engine_id: str) -> Settling:
    return Settling(await precompiled.fetch(session, postgres.SETTLING, {"engine_id": engine_id}))


StartRow = tuple[str, str, dict[str, Any]]  # worker id, its status as read, its start's values


async def record_starts(
    session: AsyncSession,
    workers: list[StartRow],
    first_starts: dict[str, datetime],
    *,
    engine_id: str,
    now: datetime,
) -> tuple[dict[str, bool], set[str]]:
    """Workers RUNNING (guarded by their status as read) and jobs' first starts (guarded by
    PENDING), one statement that also publishes JOBS; returns the workers changed (id ->
    holds_slot) and the jobs."""
    params: dict[str, Any] = {"now": now, "b_engine": engine_id}
    columns = {
        "w_ids": "id",
        "w_pids": "pid",
        "w_start_times": "pid_start_time",
        "w_run_dirs": "run_dir",
        "w_workdirs": "workdir",
        "w_started": "started_at",
        "w_hosts": "host",
        "w_branches": "branch",
    }
    for name, column in columns.items():
        params[name] = [
            values.get(column) if column != "id" else worker_id for worker_id, _, values in workers
        ]
    params["w_known"] = [known for _, known, _ in workers]
    params["w_base_commits"] = [(values.get("result") or {}).get("base_commit") for _, _, values in workers]
    params["j_ids"] = list(first_starts)
    params["j_started"] = list(first_starts.values())
    params.update(n_channel=CHANNEL, n_topic=Topic.JOBS.value)
    rows = await precompiled.fetch(session, postgres.STARTS, params)
    # The statement ran pg_notify (delivered at commit): the commit announces JOBS here too.
    unit_of_work(session).topics.add(Topic.JOBS)
    changed = {row.id: bool(row.holds_slot) for row in rows if row.kind == "worker"}
    return changed, {row.id for row in rows if row.kind == "job"}


async def claim(
    session: AsyncSession, engine_id: str, room: dict[int, int], allocated: int, actor: str
) -> None:
    """claims.claim_pending and claims.create_workers in one statement (candidates, claim,
    workers); the workers' events are recorded here."""
    depths = tuple(depth for depth, count in sorted(room.items()) if count > 0)
    params: dict[str, object] = {f"n{depth}": room[depth] for depth in depths}
    now = utcnow()
    params.update(n_allocated=allocated, b_engine=engine_id, now=now)
    for worker_id, job_id in await precompiled.fetch_tuples(session, postgres.claim(depths), params):
        record_worker_created(session, job_id, worker_id, actor, now)


async def room(
    session: AsyncSession, job_ids: list[str], depths: list[int]
) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
    """(unbound slots, room for more) per job and free slots per depth, locked (allocations
    first, then pools), in one statement."""
    rows = await precompiled.fetch(session, postgres.ROOM, {"job_ids": job_ids, "depths": depths})
    jobs = {row.key: (int(row.first), int(row.second)) for row in rows if row.kind == "job"}
    return jobs, {int(row.key): int(row.first) for row in rows if row.kind == "depth"}
