"""PostgreSQL: the engine's statements are planned for the tables as they are, not as they were
when the statement was first prepared (`Database.for_engine`).

The engine runs the same prepared statements thousands of times; after a statement's fifth run
PostgreSQL may cache one generic plan for it and keep using it until the table's statistics
change. On a new database that plan was made for near-empty tables, and it scanned `workers`
whole once per job for the settling read's "no live worker" test long after `workers` had
thousands of rows. Query plans, not timings: the plan does not depend on the machine's speed.
Autovacuum is off for the tables, so no ANALYZE in the middle replans behind the test's back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.core.config import Settings
from orchestrator.db.migrate import upgrade_database
from orchestrator.db.session import ENGINE_APPLICATION_NAME, Database
from orchestrator.engine.queries.postgres import SETTLING
from tests.support.servers import create_pg_database, drop_pg_database, server_factory
from tests.support.servers import test_database_kind as database_kind

pytestmark = pytest.mark.skipif(database_kind() != "postgres", reason="PostgreSQL's plan cache")

ENGINE_ID = "e_plans"
GROWN_TO = 3000  # jobs, each with one ended worker: the engine's history after a busy minute


def _settling_sql() -> tuple[str, list[Any]]:
    """The settling read as the engine sends it, with its parameters in order."""
    compiled = SETTLING.core_statement.compile(dialect=PGDialect_asyncpg())  # type: ignore[no-untyped-call]
    expanded = compiled.construct_expanded_state({"engine_id": ENGINE_ID})
    params = expanded.parameters
    return expanded.statement, [params[name] for name in expanded.positiontup or ()]


def _literal(value: Any) -> str:
    assert isinstance(value, str) and "'" not in value
    return f"'{value}'"


async def _add_jobs(connection: AsyncConnection, first: int, count: int, worker_status: str) -> None:
    """`count` RUNNING jobs of ENGINE_ID with one worker each, in `worker_status`."""
    await connection.exec_driver_sql(
        f"""
        INSERT INTO jobs (id, status, task_description, worker_count, depth, path, priority, agent,
                          agent_options, created_by, engine_id, created_at, updated_at)
        SELECT 'j_' || n, 'RUNNING', 't', 1, 0, 'j_' || n || '/', 0, 'simulated', '{{}}', 'test',
               '{ENGINE_ID}', now(), now()
        FROM generate_series({first}, {first + count - 1}) AS n
        """
    )
    await connection.exec_driver_sql(
        f"""
        INSERT INTO workers (id, job_id, status, worker_index, depth, agent, holds_slot, log_offset,
                             log_lines, created_at, updated_at)
        SELECT 'w_' || n, 'j_' || n, '{worker_status}', 0, 0, 'simulated', false, 0, 0, now(), now()
        FROM generate_series({first}, {first + count - 1}) AS n
        """
    )


async def _plan_after_growth(database: Database) -> str:
    """Run the settling read six times while the tables are nearly empty (as a new engine does),
    grow them, and return the plan its next run would use, on one of `database`'s connections."""
    sql, params = _settling_sql()
    arguments = ", ".join(_literal(value) for value in params)
    async with database.engine.connect() as connection:
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await _add_jobs(connection, 0, 3, "RUNNING")
        await connection.exec_driver_sql(f"PREPARE settling AS {sql}")
        for _ in range(6):
            await connection.exec_driver_sql(f"EXECUTE settling({arguments})")
        await _add_jobs(connection, 3, GROWN_TO, "EXITED")
        rows = await connection.exec_driver_sql(f"EXPLAIN EXECUTE settling({arguments})")
        plan = "\n".join(str(row[0]) for row in rows)
        await connection.exec_driver_sql("DEALLOCATE settling")
        # Emptied to no pages at all (a DELETE would leave them, and the next plan would see them).
        await connection.exec_driver_sql("TRUNCATE workers, jobs CASCADE")
    return plan


def test_the_engines_connections_plan_the_settling_read_for_the_grown_tables(tmp_path: Any) -> None:
    url = create_pg_database()

    async def run() -> tuple[str, str]:
        settings = Settings(orchestrator_data_dir=tmp_path, database_url=url)
        plain, for_engine = Database(settings), Database.for_engine(settings)
        try:
            await upgrade_database(plain)
            async with plain.engine.connect() as connection:
                for table in ("jobs", "workers"):
                    await connection.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
                await connection.commit()
            return await _plan_after_growth(plain), await _plan_after_growth(for_engine)
        finally:
            await plain.dispose()
            await for_engine.dispose()

    try:
        cached, engines = asyncio.run(run())
    finally:
        drop_pg_database(url)
    # What the API's connections (PostgreSQL's default) do: the plan made for three rows.
    assert "Seq Scan on workers" in cached, cached
    # The engine's: the live workers of each of the engine's jobs looked up by job.
    assert "Seq Scan on workers" not in engines, engines
    assert "ix_workers_job_id" in engines or "ix_workers_status" in engines, engines


def _engine_connections(url: str) -> tuple[int, int]:
    """(the engine's, the others') client connections to the database at `url` right now."""
    import asyncpg

    from tests.support.servers import PG_ADMIN_URL

    async def count() -> tuple[int, int]:
        connection = await asyncpg.connect(PG_ADMIN_URL)
        try:
            row = await connection.fetchrow(
                "SELECT count(*) FILTER (WHERE application_name = $2),"
                " count(*) FILTER (WHERE application_name <> $2)"
                " FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
                url.rsplit("/", 1)[1],
                ENGINE_APPLICATION_NAME,
            )
        finally:
            await connection.close()
        assert row is not None
        return int(row[0]), int(row[1])

    return asyncio.run(count())


def _wait_for_engine_connection(url: str) -> tuple[int, int]:
    deadline = time.monotonic() + 120  # generous: a loaded host
    while time.monotonic() < deadline:
        engines, others = _engine_connections(url)
        if engines and others:
            return engines, others
        time.sleep(0.1)
    raise AssertionError(f"no engine connection next to the API's: {_engine_connections(url)}")


def test_an_engine_in_the_api_process_and_a_standalone_one_use_the_engines_connections(
    tmp_path: Any,
) -> None:
    """The engine of `uvicorn … ` (in the API's process) and `orchestrator engine` both run their
    statements on connections of their own (`Database.for_engine`), which name themselves; the
    API's requests keep theirs."""
    for part in ("in-process", "standalone"):
        (tmp_path / part).mkdir()
    with server_factory(tmp_path / "in-process") as servers:
        api = servers.start()
        with api.client() as client:
            assert client.get("/api/jobs").status_code == 200  # the API's own connection, too
        _wait_for_engine_connection(servers.database_url())
    with server_factory(tmp_path / "standalone") as servers:
        api = servers.start(ORCHESTRATOR_ENGINE="false")
        url = servers.database_url()
        with api.client() as client:
            assert client.get("/api/jobs").status_code == 200
        assert _engine_connections(url)[0] == 0  # no engine yet: the API's are not named so
        with servers.standalone_engine(api):
            _wait_for_engine_connection(url)
