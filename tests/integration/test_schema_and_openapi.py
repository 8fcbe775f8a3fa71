"""The schema: `scripts/init_database.py` is idempotent, the migrations match the models, and the
committed `openapi.json` is what the app serves (bearer scheme, scopes, error responses)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from orchestrator.api.main import export_openapi
from orchestrator.core.config import Settings
from orchestrator.db.migrate import alembic_config
from orchestrator.db.models import Base
from orchestrator.db.session import Database
from tests.support.servers import create_pg_database, drop_pg_database
from tests.support.servers import test_database_kind as database_kind

REPO = Path(__file__).resolve().parents[2]
REGENERATE = (
    ".venv/bin/python -c \"from orchestrator.api.main import export_openapi; print(export_openapi(), end='')\" "
    "> openapi.json   (or: make openapi)"
)


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    if database_kind() == "postgres":
        url = create_pg_database()
        try:
            yield url
        finally:
            drop_pg_database(url)
    else:
        yield f"sqlite:///{tmp_path / 'fresh' / 'orchestrator.db'}"


def init_database(url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(DATABASE_URL=url, ORCHESTRATOR_DATA_DIR=str(cwd / "data"))
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "init_database.py")],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def inspect_db(url: str, tmp_path: Path, work: Any) -> Any:
    async def _run() -> Any:
        database = Database(Settings(database_url=url, orchestrator_data_dir=tmp_path / "data"))
        try:
            async with database.engine.connect() as conn:
                return await conn.run_sync(work)
        finally:
            await database.dispose()

    return asyncio.run(_run())


def _state(conn: Connection) -> dict[str, Any]:
    return {
        "tables": sorted(inspect(conn).get_table_names()),
        "version": conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all(),
        "pools": [
            tuple(r) for r in conn.execute(text("SELECT depth, max_workers, allocated FROM resource_pools"))
        ],
    }


def test_init_database_is_idempotent(database_url: str, tmp_path: Path) -> None:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    states = []
    for _ in range(2):
        result = init_database(database_url, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Database ready" in result.stdout
        assert "password" not in result.stdout
        states.append(inspect_db(database_url, tmp_path, _state))
    assert states[0] == states[1]
    assert states[0]["version"] == [head]
    assert set(Base.metadata.tables) <= set(states[0]["tables"])
    assert sorted(states[0]["pools"]) == [(d, q, 0) for d, q in enumerate([10, 8, 5, 3, 2, 1])]


def test_init_database_reports_a_bad_url_clearly(tmp_path: Path) -> None:
    result = init_database("mysql://nobody@127.0.0.1/none", tmp_path)
    assert result.returncode == 1
    assert "error: could not initialise the database" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrations_match_the_models(database_url: str, tmp_path: Path) -> None:
    assert init_database(database_url, tmp_path).returncode == 0

    def diff(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "render_as_batch": conn.dialect.name == "sqlite"}
        )
        return list(compare_metadata(context, Base.metadata))

    differences = inspect_db(database_url, tmp_path, diff)
    if database_kind() == "sqlite":
        differences = _without_sort_order_gaps(differences)
        # What SQLite's reflection cannot compare is checked here instead: the index was made
        # with its descending column.
        sql = inspect_db(database_url, tmp_path, _index_sql)
        assert "priority DESC" in sql["ix_jobs_pending_order"], sql
        assert "WHERE slots > bound" in sql["ix_allocations_unbound"], sql
    assert differences == [], (
        "the models and the migration chain differ; add a migration "
        f"(alembic revision --autogenerate) for: {differences}"
    )


# --- openapi.json -------------------------------------------------------------------------------


def test_committed_openapi_json_is_up_to_date() -> None:
    path = REPO / "openapi.json"
    assert path.exists(), f"openapi.json is missing at the repository root; generate it with:\n  {REGENERATE}"
    assert path.read_text() == export_openapi(), (
        f"openapi.json differs from what the app generates; regenerate it with:\n  {REGENERATE}"
    )


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(export_openapi())
    return loaded


def test_bearer_scheme(spec: dict[str, Any]) -> None:
    scheme = spec["components"]["securitySchemes"]["BearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer" and scheme["bearerFormat"] == "JWT"


EXPECTED_SCOPES = {
    ("get", "/api/supervisor/workers"): "supervisor:read",
    ("get", "/api/supervisor/workers/{worker_id}"): "supervisor:read",
    ("post", "/api/supervisor/workers/{worker_id}/terminate"): "supervisor:write",
    ("post", "/api/supervisor/workers/{worker_id}/pause"): "supervisor:write",
    ("post", "/api/supervisor/workers/{worker_id}/resume"): "supervisor:write",
    ("get", "/api/supervisor/metrics"): "supervisor:read",
    ("post", "/api/jobs/submit"): "jobs:write",
    ("get", "/api/jobs"): "jobs:read",
    ("get", "/api/jobs/{job_id}"): "jobs:read",
    ("post", "/api/jobs/{job_id}/cancel"): "jobs:write",
    ("get", "/api/resources/quotas"): "resources:read",
    ("post", "/api/resources/allocate"): "resources:write",
    ("post", "/api/resources/release"): "resources:write",
    ("get", "/api/resources/usage"): "resources:read",
}


def _api_operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, ops in spec["paths"].items()
        if path.startswith("/api/")
        for method, op in ops.items()
    ]


def test_the_guides_routes_declare_their_scopes(spec: dict[str, Any]) -> None:
    for (method, path), scope in EXPECTED_SCOPES.items():
        op = spec["paths"][path][method]
        assert op["security"] == [{"BearerAuth": [scope]}], (method, path, op.get("security"))


def test_every_api_route_has_security_and_error_responses(spec: dict[str, Any]) -> None:
    operations = _api_operations(spec)
    assert len(operations) >= len(EXPECTED_SCOPES)
    known = {
        "supervisor:read",
        "supervisor:write",
        "jobs:read",
        "jobs:write",
        "resources:read",
        "resources:write",
    }
    for method, path, op in operations:
        where = f"{method.upper()} {path}"
        security = op.get("security")
        assert security and len(security) == 1 and set(security[0]) == {"BearerAuth"}, where
        assert set(security[0]["BearerAuth"]) and set(security[0]["BearerAuth"]) <= known, where
        responses = op["responses"]
        assert {"401", "403"} <= set(responses), where
        for code in ("401", "403"):
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (where, code)
        if "{" in path:
            assert "404" in responses, where
        has_input = bool(op.get("parameters")) or "requestBody" in op
        if has_input:
            assert "422" in responses, where
        success = [c for c in responses if c.startswith("2")]
        assert success, where


def test_bodies_and_responses_are_modelled(spec: dict[str, Any]) -> None:
    submit = spec["paths"]["/api/jobs/submit"]["post"]
    assert "201" in submit["responses"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobSubmit"
    }
    schemas = spec["components"]["schemas"]
    assert schemas["JobSubmit"]["required"] == ["task_description"]
    for name in (
        "JobOut",
        "JobList",
        "WorkerOut",
        "WorkerList",
        "SystemMetrics",
        "AllocateResponse",
        "UsageReport",
    ):
        assert name in schemas, name
    assert spec["paths"]["/health"]["get"].get("security") is None


def _index_sql(conn: Connection) -> dict[str, str]:
    rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
    return {name: sql for name, sql in rows}


def _without_sort_order_gaps(differences: list[Any]) -> list[Any]:
    """SQLite's reflection does not report an index column's sort order, so an index with a
    DESC column shows up as "remove it, add it" under the same name and the same columns. Only
    that pair is dropped (PostgreSQL reflects the order and is compared strictly)."""

    def columns(index: Any) -> list[str]:
        return [getattr(getattr(e, "element", e), "name", str(e)) for e in index.expressions]

    removed = {d[1].name: columns(d[1]) for d in differences if d[0] == "remove_index"}
    added = {d[1].name: columns(d[1]) for d in differences if d[0] == "add_index"}
    same = {name for name, cols in removed.items() if added.get(name) == cols}
    return [d for d in differences if not (d[0] in ("remove_index", "add_index") and d[1].name in same)]
