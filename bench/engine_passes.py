"""Where an engine pass goes, per phase: statements (database round trips) and wall time.

    TMPDIR=/dev/shm [TEST_DATABASE=postgres] .venv/bin/python bench/engine_passes.py [--jobs 1000]

One engine in this process (unsandboxed, the local executor), N one-worker `true` jobs queued
first, then the engine runs them all at concurrency 10 (the depth-0 quota). Each phase of a pass
is timed around its call, and every statement SQLAlchemy sends is counted against the phase that
sent it (an executemany counts once: one round trip on asyncpg); checkouts (with their pre-ping on
PostgreSQL) and commits are counted apart. The top statements by total time follow. A profiler,
not a benchmark: its timers and listeners cost a little; compare runs of it with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import event, func, select  # noqa: E402

from orchestrator.agents.registry import AgentRegistry  # noqa: E402
from orchestrator.bootstrap import prepare_database  # noqa: E402
from orchestrator.core.auth import Actor  # noqa: E402
from orchestrator.core.config import Settings  # noqa: E402
from orchestrator.db.models import Job  # noqa: E402
from orchestrator.db.session import Database  # noqa: E402
from orchestrator.engine import engine as engine_module  # noqa: E402
from orchestrator.engine import scheduler as scheduler_module  # noqa: E402
from orchestrator.engine.engine import Engine  # noqa: E402
from orchestrator.engine.queries import workers as worker_queries  # noqa: E402
from orchestrator.executors.local import LocalExecutor  # noqa: E402
from orchestrator.jobs import service as jobs_service  # noqa: E402
from orchestrator.jobs.schemas import JobSubmit  # noqa: E402
from tests.support.servers import create_pg_database, drop_pg_database, test_database_kind  # noqa: E402

USER = Actor(name="user:bench", user_id="bench")


class Profile:
    def __init__(self) -> None:
        self.phase = "outside"
        self.statements: dict[str, int] = defaultdict(int)
        self.wall: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.by_sql: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        self.started: dict[int, float] = {}

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(owner, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            outer, self.phase = self.phase, label
            began = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.wall[label] += time.perf_counter() - began
                self.calls[label] += 1
                self.phase = outer

        setattr(owner, name, timed)

    def listen(self, database: Database) -> None:
        sync = database.engine.sync_engine

        @event.listens_for(sync, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            self.statements[self.phase] += 1
            self.started[id(cursor)] = time.perf_counter()

        @event.listens_for(sync, "after_cursor_execute")
        def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            began = self.started.pop(id(cursor), None)
            entry = self.by_sql[" ".join(statement.split())[:110]]
            entry[0] += 1
            entry[1] += time.perf_counter() - began if began is not None else 0.0

        @event.listens_for(sync, "commit")
        def commit(conn: Any) -> None:
            self.statements[self.phase + " (commits)"] += 1

        @event.listens_for(sync.pool, "checkout")
        def checkout(*_: Any) -> None:
            self.statements[self.phase + " (checkouts)"] += 1


async def scenario(root: Path, url: str, count: int, concurrency: int) -> None:
    agents = root / "agents.toml"
    agents.write_text('[agents.true]\ncommand = ["true"]\n')
    settings = Settings(
        orchestrator_data_dir=root / "data",
        database_url=url,
        orchestrator_agents_file=agents,
        orchestrator_quotas=f"{concurrency},8,5,3,2,1",
        orchestrator_sandbox="off",
    )
    database = Database(settings)
    await prepare_database(database, settings)
    registry = AgentRegistry.from_settings(settings)
    for first in range(0, count, 100):
        async with database.session() as session:
            for _ in range(min(100, count - first)):
                body = JobSubmit(task_description="t", agent="true")
                await jobs_service.submit(
                    session, settings, USER, body, registry.validate, registry.validate_limits
                )
    engine = Engine(settings, database, registry, executor=LocalExecutor())
    profile = Profile()
    profile.listen(database)
    profile.wrap(engine, "tick", "pass")
    profile.wrap(engine.ledger, "collect_exits", "collect exits (outside the transaction)")
    profile.wrap(engine.ledger, "record_starts", "record starts")
    profile.wrap(engine.ledger, "record_exits", "record exits")
    profile.wrap(engine.ledger, "settle_jobs", "settle")
    profile.wrap(engine.scheduler, "schedule", "schedule")
    profile.wrap(worker_queries, "worker_statuses", "control's read")  # SQLite: PostgreSQL's is in
    profile.wrap(scheduler_module, "pass_state", "schedule: first read")  # the scheduler's first read
    profile.wrap(engine_module, "pass_state", "quiet pass (after a blocked one)")
    profile.wrap(engine.control, "apply", "control")
    profile.wrap(engine.launcher, "launch_all", "launch")
    began = time.perf_counter()
    cpu_began = time.process_time()
    await engine.start()
    try:
        while True:
            await asyncio.sleep(0.2)
            async with database.read_session() as session:
                done = await session.scalar(
                    select(func.count()).where(Job.status.in_(("COMPLETED", "FAILED")))
                )
            if done == count:
                break
    finally:
        await engine.stop()
    span, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    passes = profile.calls["pass"]
    await database.dispose()
    print(
        f"{count} jobs at concurrency {concurrency}: {span:.2f} s, "
        f"this process {cpu:.2f} CPU-s, {passes} passes"
    )
    print(f"{'phase':44} {'calls':>6} {'ms/pass':>8} {'stmts/pass':>11}")
    labels = sorted(set(profile.wall) | {k for k in profile.statements if k != "outside"})
    for label in labels:
        per_pass = profile.wall.get(label, 0.0) / max(passes, 1) * 1000
        statements = profile.statements.get(label, 0) / max(passes, 1)
        print(f"{label:44} {profile.calls.get(label, 0):6d} {per_pass:8.2f} {statements:11.2f}")
    print("top statements by total time (count, total ms, ms each):")
    ranked = sorted(profile.by_sql.items(), key=lambda item: -item[1][1])[:18]
    for sql, (n, total) in ranked:
        print(f"  {n:6d} {total * 1000:8.1f} {total * 1000 / n:6.2f}  {sql}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    print(f"database: {test_database_kind()}, load average: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if test_database_kind() == "postgres":
            url = create_pg_database()
        else:
            url = f"sqlite:///{root / 'data' / 'orchestrator.db'}"
        try:
            asyncio.run(scenario(root, url, args.jobs, args.concurrency))
        finally:
            if test_database_kind() == "postgres":
                drop_pg_database(url)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
