"""How SQLite runs the engine's claim, whatever the backlog: the depth's first PENDING jobs are
read in order from an index (no sort of the whole queue), the few jobs holding an explicit
allocation are found through their partial index and then by key (no walk of every PENDING
job), and the engine's count of its own PENDING jobs reads an index only. Query plans, not
timings: a plan does not depend on the machine's speed. SQLite only by nature (its planner has
no statistics here; PostgreSQL keeps its own and plans differently)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Table, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.core.config import Settings
from orchestrator.core.ids import new_job_id
from orchestrator.db import precompiled
from orchestrator.db.migrate import upgrade_database
from orchestrator.db.models import Allocation, Job, utcnow
from orchestrator.db.session import Database
from orchestrator.engine import queries
from orchestrator.jobs import pages
from orchestrator.jobs import repository as jobs_repo
from tests.unit.test_state_tables import run

BACKLOG = 2000


async def _plan(
    connection: AsyncConnection, statement: precompiled.Statement, params: dict[str, Any]
) -> list[str]:
    """The plan of the SQL the engine runs (an expanding IN list as one placeholder per value)."""
    compiled = statement.for_sqlite(connection.dialect)
    values, lengths = compiled.arguments(params)
    rows = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled.sql(lengths)}", tuple(values))
    return [str(row[3]) for row in rows]


async def _seed_backlog(database: Database) -> list[str]:
    """BACKLOG queued jobs, the way a submit leaves them (a job row and an empty allocation),
    two of which then receive an explicit allocation."""
    await upgrade_database(database)
    now = utcnow()
    ids = [new_job_id() for _ in range(BACKLOG)]
    jobs = [
        {
            "id": job_id,
            "status": "PENDING",
            "task_description": "queued",
            "worker_count": 1,
            "depth": 0,
            "path": f"{job_id}/",
            "priority": index % 3,
            "agent": "simulated",
            "agent_options": {},
            "created_by": "test",
            "created_at": now,
            "updated_at": now,
        }
        for index, job_id in enumerate(ids)
    ]
    allocations = [{"job_id": job_id, "depth": 0, "slots": 0, "bound": 0, "max_slots": 1} for job_id in ids]
    async with database.session() as session:
        await session.execute(insert(Job.__table__), jobs)
        await session.execute(insert(Allocation.__table__), [{**a, "updated_at": now} for a in allocations])
        table: Table = Allocation.__table__  # type: ignore[assignment]
        await session.execute(update(table).where(table.c.job_id.in_(ids[-2:])).values(slots=1))
    return ids


def test_claiming_reads_indexes_only_whatever_the_backlog(tmp_path: Path) -> None:
    settings = Settings(orchestrator_data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'plans.db'}")

    async def work(database: Database) -> tuple[dict[str, list[str]], list[str], list[str]]:
        ids = await _seed_backlog(database)
        params = {"n0": 15, "allocated": ids[-2:], "engine_id": "engine-test"}
        async with database.engine.connect() as connection:
            plans = {
                "claim": await _plan(
                    connection, queries._claim_candidates((0,), allocated=True, postgres=False), params
                ),
                "unbound": await _plan(connection, queries._FAST_UNBOUND_JOB_IDS, {}),
                "owned": await _plan(connection, queries._OWNED_PENDING, params),
                "take": await _plan(connection, queries._CLAIM, {"ids": ids[:15], "b_engine": "engine-test"}),
            }
        async with database.session() as session:
            claimed = await queries.claim_pending(session, "engine-test", {0: 3})
        return plans, [job.id for job in claimed], ids

    plans, claimed, ids = run(settings, work)

    # The depth's part: a walk of the index in (priority DESC, created_at) order, never a sort.
    assert "SEARCH jobs USING INDEX ix_jobs_pending_order (status=? AND depth=?)" in plans["claim"], plans
    assert not any("RIGHT PART OF ORDER BY" in line for line in plans["claim"]), plans
    # The allocated jobs: their partial index, then each job by its key.
    assert plans["unbound"] == ["SCAN allocations USING INDEX ix_allocations_unbound"], plans
    assert "SEARCH jobs USING INDEX sqlite_autoindex_jobs_1 (id=?)" in plans["claim"], plans
    assert "SEARCH jobs USING INDEX ix_jobs_pending_order (status=?)" not in plans["claim"], plans
    # The engine's PENDING jobs per depth: from the index alone.
    assert plans["owned"] == [
        "SEARCH jobs USING COVERING INDEX ix_jobs_engine_status (engine_id=? AND status=?)"
    ], plans
    # Taking the chosen jobs: each by its key.
    assert plans["take"] == ["SEARCH jobs USING INDEX sqlite_autoindex_jobs_1 (id=?)"], plans
    # And the claim takes what it should: the two allocated jobs, then the 3 highest-priority
    # jobs, oldest first.
    expected_queue = [job_id for index, job_id in enumerate(ids) if index % 3 == 2][:3]
    assert sorted(claimed) == sorted(ids[-2:] + expected_queue), (claimed, expected_queue)


def test_listing_jobs_walks_an_index_whatever_the_table(tmp_path: Path) -> None:
    """GET /api/jobs (newest first, a page of 50): read backwards from ix_jobs_created_order and
    stopped after the page, never a sort of every job (issue 19: 1.9 s a page at 100,000 jobs)."""
    settings = Settings(orchestrator_data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'plans.db'}")

    async def work(database: Database) -> tuple[list[str], list[str], list[str]]:
        ids = await _seed_backlog(database)
        statement = jobs_repo.listing().limit(50).offset(0)
        async with database.engine.connect() as connection:
            plan = await _plan(connection, precompiled.Statement(statement), {})
        async with database.read_session() as session:
            jobs, total = await jobs_repo.list_jobs(session, jobs_repo.JobFilter(), limit=50)
        assert total == BACKLOG
        return plan, [job.id for job in jobs], ids

    plan, page, ids = run(settings, work)
    assert plan == ["SCAN jobs USING INDEX ix_jobs_created_order"], plan
    # Every job of the backlog has the same created_at: the id breaks the tie, newest id first.
    assert page == sorted(ids, reverse=True)[:50]


def test_a_subtree_is_searched_in_the_path_index(tmp_path: Path) -> None:
    """A worker token's page, its count and its subtree's events (what agents poll) find the
    subtree's jobs in ix_jobs_path, not by walking every job (`LIKE ... ESCAPE` alone cannot
    use the index on SQLite)."""
    settings = Settings(orchestrator_data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'plans.db'}")
    where = jobs_repo.JobFilter(path_prefix="j_root/")

    async def work(database: Database) -> dict[str, list[str]]:
        await _seed_backlog(database)
        page, total, _, _ = pages._statements(where, 50, 0, "sqlite", False)
        events = jobs_repo.subtree_statement("j_root/", "sqlite", after_id=0, limit=1000)
        async with database.engine.connect() as connection:
            return {
                "page": await _plan(connection, page, {}),
                "total": await _plan(connection, precompiled.Statement(total), {}),
                "events": await _plan(connection, precompiled.Statement(events), {}),
            }

    plans = run(settings, work)
    search = "SEARCH jobs USING {}INDEX ix_jobs_path (path>? AND path<?)"
    assert plans["page"] == [search.format(""), "USE TEMP B-TREE FOR ORDER BY"], plans
    assert plans["total"] == [search.format("COVERING ")], plans
    assert search.format("") in plans["events"], plans
    assert not [step for step in plans["events"] if step.startswith("SCAN")], plans
