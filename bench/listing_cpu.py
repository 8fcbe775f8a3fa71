"""CPU of one `GET /api/jobs?limit=50` page below the HTTP layer, in-process, for when the machine
is too loaded for wrk's figures to mean much (process CPU time is not inflated by other processes
the way wall-clock latency is):

    .venv/bin/python bench/listing_cpu.py [--database-url postgresql+asyncpg://...] [--jobs 2000]

Five ways, in alternating rounds (min and median of 15 rounds of 100):

* `empty session`: a read session that only begins and ends (what every request pays);
* `validated`: the page as it was answered before jobs/pages.py: rows, JobList.model_validate,
  TypeAdapter(JobList).dump_json (FastAPI's response-model path);
* `pages, read`: jobs/pages.py with no page remembered (the data changed since the last page;
  the total remembered, as for another window of the same list);
* `pages, uncounted`: the same with no total remembered either (on PostgreSQL, the page and its
  total then come from one statement: db/counts.py's `counted_page`);
* `pages, remembered`: jobs/pages.py answering the remembered page (nothing changed): the
  version read outside the session (db/version_reads.py), no connection taken.

The count is remembered in all but `uncounted` (db/counts.py). Give a PostgreSQL database that exists and
may be written (its jobs table is filled); SQLite is a temporary file.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import insert

from orchestrator.core.config import Settings
from orchestrator.db import counts, version_reads
from orchestrator.db.migrate import upgrade_database
from orchestrator.db.models import Job
from orchestrator.db.session import Database
from orchestrator.jobs import pages
from orchestrator.jobs import repository as repo
from orchestrator.jobs.schemas import JobList


async def run(database_url: str | None, jobs: int) -> None:
    data = Path(tempfile.mkdtemp(prefix="bench-listing-"))
    db = Database(
        Settings(orchestrator_data_dir=data, database_url=database_url or f"sqlite:///{data / 'o.db'}")
    )
    await upgrade_database(db)
    now = datetime.now(UTC)
    stamp = int(time.time())
    async with db.session() as session:
        rows = [
            {
                "id": f"j_bl{stamp}{i:07d}",
                "status": "COMPLETED",
                "task_description": f"seeded job {i}",
                "worker_count": 1,
                "depth": 0,
                "path": f"j_bl{stamp}{i:07d}/",
                "priority": 0,
                "agent": "simulated",
                "agent_options": {},
                "created_by": "bench",
                **dict.fromkeys(("created_at", "updated_at", "started_at", "finished_at"), now),
            }
            for i in range(jobs)
        ]
        await session.execute(insert(Job), rows)
    adapter, where = TypeAdapter(JobList), repo.JobFilter()

    async def validated() -> bytes:
        async with db.read_session() as session:
            rows, total = await repo.list_jobs(session, where, limit=50, offset=0)
            fields = rows[0]._fields
            jobs = [dict(zip(fields, row, strict=True)) for row in rows]
            page = JobList.model_validate({"jobs": jobs, "total": total, "limit": 50, "offset": 0})
            return adapter.dump_json(page)

    async def read() -> bytes:
        async with db.read_session() as session:
            pages._by_database.clear()
            watching = version_reads.watcher(db.engine)
            if watching is not None:
                watching.remembered.clear()
            (await session.connection()).info.pop("orchestrator_pages", None)
            return await pages.page_json(session, where, limit=50, offset=0)

    async def uncounted() -> bytes:
        counts._by_database.clear()
        async with db.read_session() as session:
            (await session.connection()).info.pop("orchestrator_counts", None)
        return await read()

    async def remembered() -> bytes:
        async with db.read_session() as session:
            return await pages.page_json(session, where, limit=50, offset=0)

    async def empty() -> Any:
        async with db.read_session() as session:
            return await session.connection()

    assert await validated() == await read() == await remembered()
    ways: dict[str, Callable[[], Awaitable[Any]]] = {
        "empty session": empty, "validated": validated, "pages, read": read, "pages, uncounted": uncounted,
        "pages, remembered": remembered,
    }  # fmt: skip
    figures: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(15):
        for name, way in ways.items():
            started = time.process_time()
            for _ in range(100):
                await way()
            figures[name].append((time.process_time() - started) * 10)
    print(f"{db.engine.dialect.name}, {jobs} jobs: CPU ms per page (min / median of 15 rounds of 100)")
    for name, values in figures.items():
        print(f"  {name:18} {min(values):.3f} / {sorted(values)[7]:.3f}")
    await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url")
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(run(args.database_url, args.jobs))


if __name__ == "__main__":
    main()
