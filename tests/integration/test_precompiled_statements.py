"""Precompiled statements (orchestrator.db.precompiled, on SQLite run on the driver) store and read
exactly what the same statements store and read through SQLAlchemy, in the session's
transaction; and every one of them in orchestrator/ does so on this database (the conformance
test, below: run on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import pkgutil
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import DateTime, Table, bindparam, insert, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

import orchestrator
from orchestrator.core.config import Settings
from orchestrator.db import precompiled
from orchestrator.db.models import Allocation, Base, Job, ResourcePool, UTCDateTime, Worker
from orchestrator.db.session import Database
from orchestrator.jobs import submit_rows
from orchestrator.jobs.repository import JobFilter

JOBS = cast(Table, Job.__table__)
WORKERS = cast(Table, Worker.__table__)
_IDS = bindparam("ids", expanding=True)
SELECT_WORKERS = select(
    Worker.id, Worker.status, Worker.holds_slot, Worker.result, Worker.started_at, Worker.pid_start_time
).where(Worker.id.in_(_IDS), Worker.status.in_(("RUNNING", "PAUSED")))
FAST_SELECT = precompiled.Statement(SELECT_WORKERS)
NOT_IN = (
    select(Worker.id).where(Worker.job_id == bindparam("job"), Worker.id.not_in(_IDS)).order_by(Worker.id)
)
FAST_NOT_IN = precompiled.Statement(NOT_IN)
SET_RESULT = (
    update(WORKERS)
    .where(WORKERS.c.id == bindparam("b_id"))
    .values(result=bindparam("result"), started_at=bindparam("started_at"), holds_slot=bindparam("holds"))
)
FAST_SET_RESULT = precompiled.Statement(SET_RESULT)
RELEASE = precompiled.Statement(
    update(Worker)
    .where(Worker.id.in_(_IDS), Worker.holds_slot.is_(True))
    .values(holds_slot=False)
    .returning(Worker.id, Worker.finished_at)
)
INSERT_JOB = precompiled.Statement(insert(JOBS))


def run(settings: Settings, body: Callable[[Database], Awaitable[None]]) -> None:
    async def scenario() -> None:
        database = Database(settings)
        try:
            await body(database)
        finally:
            await database.dispose()

    asyncio.run(scenario())


def job_row(job_id: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": job_id,
        "status": "RUNNING",
        "task_description": "t",
        "worker_count": 3,
        "depth": 0,
        "parent_job_id": None,
        "path": f"{job_id}/",
        "priority": 0,
        "agent": "simulated",
        "agent_options": {"a": [1, 2]},
        "timeout_seconds": None,
        "repository": None,
        "base_ref": None,
        "workspace_id": None,
        "created_by": "tester",
        "created_by_worker_id": None,
        "engine_id": None,
        "status_reason": None,
        "max_cost_usd": None,
        "max_turns": None,
        "delegation_key": None,
        "limits": None,
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
    }


async def add_job_with_workers(session: AsyncSession, job_id: str) -> list[str]:
    await session.execute(insert(JOBS), [job_row(job_id)])
    ids = [f"{job_id}w{i}" for i in range(3)]
    now = datetime.now(UTC)
    session.add_all(
        Worker(
            id=worker_id,
            job_id=job_id,
            status="RUNNING",
            worker_index=i,
            depth=0,
            agent="simulated",
            holds_slot=True,
            pid_start_time=2**40 + i,
            created_at=now,
            updated_at=now,
        )
        for i, worker_id in enumerate(ids)
    )
    await session.flush()
    return ids


def test_values_written_on_the_driver_are_stored_as_sqlalchemy_stores_them(settings: Settings) -> None:
    """Same values, one row through the session and one on the driver: the database holds the
    same text for both (on SQLite, datetimes are strings that must sort and compare alike)."""
    started = datetime(2026, 11, 27, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    values = {"result": {"k": [1, "two", None], "n": 1.5}, "started_at": started, "holds": False}

    async def body(database: Database) -> None:
        async with database.session() as session:
            ids = await add_job_with_workers(session, "jfast1")
            await session.execute(SET_RESULT, [{"b_id": ids[0], **values}])
            changed = await precompiled.execute_many(session, FAST_SET_RESULT, [{"b_id": ids[1], **values}])
            assert changed == 1
        async with database.session() as session:
            raw = (
                await session.execute(
                    text(
                        "SELECT id, CAST(result AS TEXT), CAST(started_at AS TEXT), holds_slot FROM workers"
                        " WHERE id IN (:a, :b) ORDER BY id"
                    ),
                    {"a": ids[0], "b": ids[1]},
                )
            ).all()
            assert raw[0][1:] == raw[1][1:]
            through_session = (await session.execute(SELECT_WORKERS, {"ids": ids})).all()
            on_driver = await precompiled.fetch(session, FAST_SELECT, {"ids": ids})
            assert [tuple(row) for row in on_driver] == [tuple(row) for row in through_session]
            by_id = {row.id: row for row in on_driver}
            assert by_id[ids[1]].started_at == started  # aware, UTC, microseconds kept
            assert by_id[ids[1]].started_at.tzinfo is not None
            assert by_id[ids[1]].result == values["result"]
            assert by_id[ids[1]].holds_slot is False and by_id[ids[2]].holds_slot is True
            assert by_id[ids[2]].pid_start_time == 2**40 + 2  # a 64-bit value survives

    run(settings, body)


def test_lists_literals_and_returning(settings: Settings) -> None:
    async def body(database: Database) -> None:
        async with database.session() as session:
            ids = await add_job_with_workers(session, "jfast2")
            await session.execute(update(Worker).where(Worker.id == ids[2]).values(status="COMPLETED"))
            # The statement's own literals ('RUNNING', 'PAUSED') apply alongside the IN list.
            rows = await precompiled.fetch(session, FAST_SELECT, {"ids": [*ids, "missing"]})
            assert sorted(row.id for row in rows) == ids[:2]
            # NOT IN, with a list and with an empty one (which matches every row).
            others = await precompiled.fetch(session, FAST_NOT_IN, {"job": "jfast2", "ids": [ids[0]]})
            assert [row.id for row in others] == ids[1:]
            everyone = await precompiled.fetch(session, FAST_NOT_IN, {"job": "jfast2", "ids": []})
            assert [row.id for row in everyone] == ids
            assert await precompiled.fetch(session, FAST_SELECT, {"ids": []}) == []
            released = await precompiled.fetch(session, RELEASE, {"ids": ids[:2]})
            assert sorted(row.id for row in released) == ids[:2]
            assert all(row.finished_at is None for row in released)
            assert await precompiled.fetch(session, RELEASE, {"ids": ids[:2]}) == []  # released already
            assert await precompiled.execute(session, FAST_SET_RESULT, {"b_id": "missing", **_nothing()}) == 0

    run(settings, body)


def _nothing() -> dict[str, Any]:
    return {"result": None, "started_at": None, "holds": False}


def test_writes_on_the_driver_belong_to_the_session_transaction(settings: Settings) -> None:
    async def body(database: Database) -> None:
        with pytest.raises(RuntimeError):
            async with database.session() as session:
                await precompiled.execute_many(session, INSERT_JOB, [job_row("jfast3")])
                raise RuntimeError("roll back")
        async with database.session() as session:
            assert await session.get(Job, "jfast3") is None
            await precompiled.execute_many(session, INSERT_JOB, [job_row("jfast3")])
        async with database.session() as session:
            job = await session.get(Job, "jfast3")
            assert job is not None and job.agent_options == {"a": [1, 2]}

    run(settings, body)


def test_a_constraint_violation_is_sqlalchemy_s_integrity_error(settings: Settings) -> None:
    async def body(database: Database) -> None:
        async with database.session() as session:
            await precompiled.execute_many(session, INSERT_JOB, [job_row("jfast4")])
        with pytest.raises(IntegrityError):
            async with database.session() as session:
                await precompiled.execute_many(session, INSERT_JOB, [job_row("jfast4")])  # same key

    run(settings, body)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 27, 12, 30, 15, 123456, tzinfo=UTC),
        datetime(2026, 11, 27, 12, 30, 15, tzinfo=timezone(timedelta(hours=-5))),  # no microseconds
        datetime(1999, 1, 2, 3, 4, 5, 6),  # naive: taken as UTC
    ],
)
def test_sqlite_datetimes_are_the_text_sqlalchemy_writes(moment: datetime) -> None:
    """UTCDateTime makes SQLite's text itself (fast); it must be SQLAlchemy's own, byte for byte,
    so rows written by either sort and compare alike, and read back as the same instant."""
    dialect = sqlite.dialect()
    ours = UTCDateTime().bind_processor(dialect)
    theirs = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert ours is not None and theirs is not None
    as_utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    assert ours(moment) == theirs(as_utc.replace(tzinfo=None))
    read = UTCDateTime().result_processor(dialect, None)
    assert read is not None and read(ours(moment)) == as_utc and read(ours(moment)).tzinfo is not None
    assert ours(None) is None and read(None) is None


# --- Conformance: every precompiled statement in orchestrator/, on this database -------------------
#
# Each statement runs twice on the same seeded rows, each time in a transaction rolled back after:
# once as the application runs it (precompiled.fetch / execute / execute_many: on SQLite on the
# driver) and once through SQLAlchemy's Core connection. The rows it returns, the rows it changed
# and the tables afterwards must be the same, and the run must do something (rows back, or a
# change), so a case cannot pass by matching nothing. Statements are found, not listed: every
# precompiled.Statement a module of orchestrator/ holds (a global, a global dict's value, or what
# a functools.cache builder returns), so a new statement without a case here fails.

ENGINE = "e_conform"
NOW = datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=UTC)
FETCH, EXECUTE, MANY = "fetch", "execute", "execute_many"
Trial = tuple[precompiled.Statement, str, Any]  # statement, how it is run, parameters
SEEDED_TABLES = ("jobs", "workers", "allocations", "resource_pools", "workspaces", "events")


def find_statements() -> dict[str, Any]:
    """Every precompiled statement (or cached builder of statements) in orchestrator/, by name."""
    found: dict[str, Any] = {}
    for info in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
        spec = importlib.util.find_spec(info.name)
        if info.ispkg or spec is None or spec.origin is None:
            continue
        if "precompiled" not in Path(spec.origin).read_text() or info.name.startswith(
            "orchestrator.db.precompiled"
        ):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, precompiled.Statement):
                found[f"{info.name}.{name}"] = value
            elif isinstance(value, dict):
                found |= {
                    f"{info.name}.{name}[{key!r}]": item
                    for key, item in value.items()
                    if isinstance(item, precompiled.Statement)
                }
            elif _is_statement_builder(value, info.name):
                found[f"{info.name}.{name}()"] = value
    return found


def _is_statement_builder(value: Any, module: str) -> bool:
    """A functools.cache builder of this module returning a statement (built once per argument)."""
    if not (
        callable(value) and getattr(value, "__module__", None) == module and hasattr(value, "cache_info")
    ):
        return False
    return "Statement" in str(getattr(value, "__wrapped__", value).__annotations__.get("return"))


def _claims(build: Any, postgres: bool) -> list[Trial]:
    counts = {"n0": 5, "n1": 5}
    if postgres:
        return [(build((0, 1), allocated=True, postgres=True), FETCH, counts | {"n_allocated": 5})]
    return [
        (build((0, 1), allocated=False, postgres=False), FETCH, counts),
        (build((0,), allocated=True, postgres=False), FETCH, {"n0": 5, "allocated": ["c_pend1"]}),
    ]


def _event() -> dict[str, Any]:
    return {
        "job_id": "c_run",
        "worker_id": "c_run_w0",
        "kind": "worker.status",
        "actor": "conformance",
        "from_status": "IDLE",
        "to_status": "RUNNING",
        "reason": None,
        "data": {"k": [1, None]},
        "created_at": NOW,
    }


def _new_worker() -> dict[str, Any]:
    return {
        "id": "c_new_w0",
        "job_id": "c_pend0",
        "workspace_id": None,
        "status": "IDLE",
        "worker_index": 0,
        "depth": 0,
        "agent": "simulated",
        "holds_slot": False,
        "log_offset": 0,
        "log_lines": 0,
        "cost_usd": 0.0,
        "input_tokens": 0,
        "output_tokens": 0,
        "created_at": NOW,
        "updated_at": NOW,
    }


def _submitted() -> dict[str, Any]:
    row = {name: value for name, value in job_row("c_submit").items() if name in submit_rows.JOB_COLUMNS}
    row |= {"status": "PENDING", "created_at": NOW, "updated_at": NOW, "workspace_id": "c_ws_new"}
    row |= {"a_depth": 0, "a_max_slots": 3, "a_updated_at": NOW}
    return row | {"w_id": "c_ws_new", "w_repository": None, "w_root_job_id": "c_submit", "w_created_at": NOW}


def _worker_change() -> dict[str, Any]:
    return {
        "b_id": "c_run_w0",
        "b_status": "IDLE",
        "status": "RUNNING",
        "updated_at": NOW,
        "holds_slot": True,
    }


def _worker_changes() -> dict[str, Any]:
    """`_worker_change` and the same change of a worker whose status is not IDLE (unchanged)."""
    one, stale = _worker_change(), _worker_change() | {"b_id": "c_run_w1"}
    return {f"a_{name}": [one[name], stale[name]] for name in one}


def _case(how: str, params: Any) -> Callable[[Any, bool], list[Trial]]:
    return lambda statement, _postgres: [(statement, how, params)]


def _on_postgres(how: str, params: Any) -> Callable[[Any, bool], list[Trial]]:
    return lambda statement, postgres: [(statement, how, params)] if postgres else []


def _starts() -> dict[str, Any]:
    """One IDLE worker started (with a branch), one started meanwhile elsewhere (its status as
    read is stale: not changed), one PENDING job's first start."""
    return {
        "w_ids": ["c_run_w0", "c_run_w1"],
        "w_known": ["IDLE", "IDLE"],
        "w_pids": [4242, 4343],
        "w_start_times": [2**40, None],
        "w_run_dirs": ["/runs/w0", "/runs/w1"],
        "w_workdirs": ["/work/w0", "/work/w1"],
        "w_started": [NOW, NOW],
        "w_hosts": ["host-a", "host-a"],
        "w_branches": ["orchestrator/c_run/w0", None],
        "w_base_commits": ["abc123", None],
        "j_ids": ["c_pend0", "c_run"],
        "j_started": [NOW, NOW],
        "now": NOW,
        "b_engine": ENGINE,
        "n_channel": "orchestrator_conformance",
        "n_topic": "jobs",
    }


def _slot_moves() -> dict[str, Any]:
    """A new slot of depth 0 added to c_run's allocation and bound to c_run_w0."""
    return {
        "a_jobs": ["c_run"],
        "a_bound": [1],
        "a_slots": [1],
        "p_depths": [0],
        "p_counts": [1],
        "hold": ["c_run_w0"],
        "now": NOW,
        # The pass's events ride along: one with data, one without.
        "e_jobs": ["c_run", "c_run"],
        "e_workers": ["c_run_w0", None],
        "e_kinds": ["worker.status", "job.status"],
        "e_actors": ["engine:e", "engine:e"],
        "e_from": ["IDLE", None],
        "e_to": ["RUNNING", "RUNNING"],
        "e_reasons": ["started", None],
        "e_data": ['{"a": 1}', "null"],
        "e_at": [NOW, NOW],
    }


R, J = "orchestrator.resources.repository.", "orchestrator.jobs.submit_rows."
PG = "orchestrator.engine.queries.postgres."
CLAIMS, SETTLE = "orchestrator.engine.queries.claims.", "orchestrator.engine.queries.settle."
WORKERS = "orchestrator.engine.queries.workers."
CASES: dict[str, Callable[[Any, bool], list[Trial]]] = {
    "orchestrator.db.unit_of_work._INSERT_EVENTS": _case(MANY, [_event(), _event() | {"kind": "agent.x"}]),
    "orchestrator.db.transitions._guarded_update()": lambda build, _: [
        (build(Worker, ("holds_slot", "status", "updated_at")), MANY, [_worker_change()])
    ],
    # PostgreSQL: a batch of one shape as arrays; the second row's status is not as read (stale).
    "orchestrator.db.transitions._guarded_update_from_arrays()": lambda build, postgres: (
        [(build(Worker, ("holds_slot", "status", "updated_at")), EXECUTE, _worker_changes())]
        if postgres
        else []
    ),
    "orchestrator.db.transitions._statuses_of()": lambda build, _: [
        (build(Job), FETCH, {"ids": ["c_run", "c_pend0"]}),
        (build(Worker), FETCH, {"ids": ["c_run_w0", "c_run_w1"]}),
    ],
    SETTLE + "_CHILDREN": _case(FETCH, {"ids": ["c_run"]}),
    CLAIMS + "_CLAIM": _case(FETCH, {"ids": ["c_pend0", "c_pend1", "c_run"], "b_engine": ENGINE}),
    SETTLE + "_ENDINGS_OF_JOBS": _case(FETCH, {"ids": ["c_run", "c_done"]}),
    CLAIMS + "_FAST_UNBOUND_JOB_IDS": _case(FETCH, {}),
    CLAIMS + "_INSERT_WORKERS": _case(MANY, [_new_worker()]),
    SETTLE + "_JOBS_WITHOUT_LIVE_WORKERS": _case(FETCH, {"engine_id": ENGINE}),
    CLAIMS + "_OWNED_PENDING": _case(FETCH, {"engine_id": ENGINE}),
    SETTLE + "_UNBOUND": _case(FETCH, {"ids": ["c_run", "c_pend0"]}),
    WORKERS + "_WORKER_STATUSES": _case(FETCH, {"ids": ["c_run_w0", "c_run_w1", "c_done_w0"]}),
    CLAIMS + "_claim_candidates()": lambda build, postgres: _claims(build, postgres),
    CLAIMS + "_idle_workers_statement()": lambda build, postgres: [
        (build((0,), postgres), FETCH, {"n0": 5, "engine_id": ENGINE, "limit": 10}),
        (build((), postgres), FETCH, {"engine_id": ENGINE, "limit": 10}),  # no free slot: bound ones only
    ],
    J + "_INSERT_ALLOCATION": _case(EXECUTE, _submitted() | {"id": "c_pend1"}),  # c_pend1 has none
    J + "_INSERT_JOB": _case(EXECUTE, _submitted() | {"workspace_id": None}),
    J + "_INSERT_WORKSPACE": _case(EXECUTE, _submitted()),
    R + "_ALLOCATIONS_BIND_NEW": _case(MANY, [{"b_job": "c_run", "b_n": 1, "b_now": NOW}]),
    R + "_ALLOCATIONS_RETURN": _case(MANY, [{"b_job": "c_run", "b_n": 1, "b_now": NOW}]),
    R + "_ALLOCATIONS_ROOM": _case(FETCH, {"job_ids": ["c_run", "c_pend0"]}),
    R + "_POOLS_FREE_STATEMENTS[(False, False)]": _case(FETCH, {}),
    R + "_POOLS_FREE_STATEMENTS[(False, True)]": _case(FETCH, {}),
    R + "_POOLS_FREE_STATEMENTS[(True, False)]": _case(FETCH, {"depths": [0, 1]}),
    R + "_POOLS_FREE_STATEMENTS[(True, True)]": _case(FETCH, {"depths": [1]}),
    R + "_POOL_GIVE_BACK": _case(EXECUTE, {"b_depth": 0, "b_count": 1}),
    R + "_POOL_TAKE": _case(EXECUTE, {"b_depth": 1, "b_count": 2}),
    R + "_WORKERS_HOLD": _case(EXECUTE, {"ids": ["c_run_w0", "c_run_w1"]}),
    R + "_WORKERS_RELEASE": _case(FETCH, {"ids": ["c_run_w0", "c_run_w1"]}),
    "orchestrator.engine.queries.state.PASS_STATE": _case(
        FETCH, {"engine_id": ENGINE, "live": ["c_run_w0", "c_run_w1", "c_done_w0"]}
    ),
    WORKERS + "_EXITING": _case(FETCH, {"ids": ["c_run_w0", "c_run_w1", "c_done_w0"]}),
    # PostgreSQL's merged statements (engine/queries/postgres.py): none runs on SQLite.
    PG + "SETTLING": _on_postgres(FETCH, {"engine_id": ENGINE}),
    PG + "STARTS": _on_postgres(FETCH, _starts()),
    PG + "SLOT_MOVES": _on_postgres(FETCH, _slot_moves()),
    PG + "ROOM": _on_postgres(FETCH, {"job_ids": ["c_run", "c_pend0"], "depths": [0, 1]}),
    # The jobs list's page (its data version column left out: it differs between connections).
    "orchestrator.jobs.pages._statements()": lambda build, postgres: [
        (build(where, limit, 0, "postgresql" if postgres else "sqlite", False)[0], FETCH, {})
        for where, limit in ((JobFilter(), 50), (JobFilter(status="PENDING", path_prefix="c_"), 2))
    ],
    # One job's row (GET /api/jobs/{id}).
    "orchestrator.jobs.pages._one_statement()": lambda build, postgres: [
        (build("postgresql" if postgres else "sqlite"), FETCH, {"job_id": "c_run"})
    ],
    PG + "claim()": lambda build, postgres: (
        [(build((0, 1)), FETCH, {"n0": 5, "n1": 5, "n_allocated": 5, "b_engine": ENGINE, "now": NOW})]
        if postgres
        else []
    ),
}
FOUND = find_statements()


def test_every_precompiled_statement_has_a_conformance_case() -> None:
    assert len(FOUND) >= 20, sorted(FOUND)  # the finder finds them (engine, resources, jobs, db)
    assert sorted(set(FOUND) - set(CASES)) == [], "add a case to CASES for each new statement"
    assert sorted(set(CASES) - set(FOUND)) == [], "a case for a statement that no longer exists"


def test_the_submit_insert_names_every_column_a_new_job_sets() -> None:
    """jobs/submit_rows.py writes a submitted job with a precompiled INSERT of `JOB_COLUMNS`: a
    column of `jobs` missing there would be left NULL (or its server default) on every submit."""
    left_null_on_submit = {"engine_id", "status_reason", "started_at", "finished_at"}
    assert set(submit_rows.JOB_COLUMNS) == set(JOBS.columns.keys()) - left_null_on_submit


@pytest.fixture(scope="module")
def seeded(settings: Settings) -> Settings:
    """Jobs in each state the statements look for: two unowned PENDING (depths 0 and 1), one
    PENDING this engine owns, one RUNNING with an IDLE and a RUNNING worker holding a slot and
    an allocation with an unbound slot, one RUNNING whose only worker has ended."""

    def job(job_id: str, status: str, **values: Any) -> dict[str, Any]:
        return job_row(job_id) | {"status": status, "created_at": NOW, "updated_at": NOW} | values

    def worker(worker_id: str, job_id: str, index: int, status: str, holds: bool) -> Worker:
        return Worker(
            id=worker_id, job_id=job_id, status=status, worker_index=index, depth=0, agent="simulated",
            holds_slot=holds, created_at=NOW, updated_at=NOW,
        )  # fmt: skip

    async def body(database: Database) -> None:
        async with database.session() as session:
            await session.execute(
                insert(JOBS),
                [
                    job("c_run", "RUNNING", engine_id=ENGINE),
                    job("c_pend0", "PENDING", worker_count=2),
                    job("c_pend1", "PENDING", depth=1, parent_job_id="c_run", path="c_run/c_pend1/"),
                    job("c_owned", "PENDING", engine_id=ENGINE),
                    job("c_done", "RUNNING", engine_id=ENGINE),
                ],
            )
            session.add_all(
                [
                    worker("c_run_w0", "c_run", 0, "IDLE", False),
                    worker("c_run_w1", "c_run", 1, "RUNNING", True),
                    worker("c_done_w0", "c_done", 0, "COMPLETED", False),
                    Allocation(job_id="c_run", depth=0, slots=2, bound=1, max_slots=3, updated_at=NOW),
                    Allocation(job_id="c_pend0", depth=0, slots=0, bound=0, max_slots=2, updated_at=NOW),
                ]
            )
            await session.execute(update(ResourcePool).where(ResourcePool.depth == 0).values(allocated=2))

    run(settings, body)
    return settings


@pytest.mark.parametrize("name", sorted(FOUND))
def test_a_precompiled_statement_runs_as_sqlalchemy_runs_it(seeded: Settings, name: str) -> None:
    async def body(database: Database) -> None:
        assert name in CASES, f"no conformance case for {name}"
        for statement, how, params in CASES[name](FOUND[name], database.is_postgres):
            precompiled_run = await _outcome(database, statement, how, params, precompiled_path=True)
            sqlalchemy_run = await _outcome(database, statement, how, params, precompiled_path=False)
            assert precompiled_run == sqlalchemy_run
            returned, changed, before, after = precompiled_run
            assert returned or changed or before != after, f"{name} did nothing: its case tests nothing"

    run(seeded, body)


async def _outcome(
    database: Database, statement: precompiled.Statement, how: str, params: Any, *, precompiled_path: bool
) -> tuple[list[str], int, list[Any], list[Any]]:
    """(rows returned, rows changed when the driver says, tables before, tables after), in a
    transaction rolled back."""
    session = database.sessionmaker()
    try:
        before = await _tables(session)
        returned: list[Any] = []
        changed = 0
        if precompiled_path:
            if how == FETCH:
                returned = await precompiled.fetch(session, statement, params)
            elif how == EXECUTE:
                changed = await precompiled.execute(session, statement, params)
            else:
                changed = await precompiled.execute_many(session, statement, params)
        else:
            result = await (await session.connection()).execute(statement.core_statement, params)
            if how == FETCH:
                returned = list(result.all())
            else:
                changed = result.rowcount
        return (
            _made(sorted(repr(tuple(row)) for row in returned)),
            max(changed, 0),
            before,
            await _tables(session),
        )
    finally:
        await session.rollback()
        await session.close()


def _made(rows: list[str]) -> list[str]:
    """Ids a statement makes itself (PostgreSQL's claim makes its workers' ids, core/ids.py's
    shape, at random) differ between runs: compared as made, the seeded ids never have it."""
    return sorted(_MADE_ID.sub("'w_made'", row) for row in rows)


_MADE_ID = re.compile(r"'w_[0-9a-f]{12}'")


async def _tables(session: AsyncSession) -> list[Any]:
    rows: list[Any] = []
    for name in SEEDED_TABLES:
        table = Base.metadata.tables[name]
        # Not an id from a sequence (events): PostgreSQL's do not roll back, so each run's differ.
        columns = [
            column for column in table.columns if not (column.primary_key and column.autoincrement is True)
        ]
        result = await session.execute(select(*columns))
        rows.append(_made([repr(tuple(row)) for row in result]))
    return rows
