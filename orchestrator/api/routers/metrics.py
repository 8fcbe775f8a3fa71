"""`GET /metrics` (Prometheus text format) and `GET /ready`; neither needs a token.

Why the numbers are right under `uvicorn --workers 4`: everything that describes the system
(jobs, workers, slots, latencies of jobs and workers, agent cost) is computed from the shared
database at scrape time, so every process gives the same answer; cumulative histograms are
computed in SQL from timestamps, which only grow as jobs finish. Only API request latency is
per process; it uses prometheus-client's multiprocess files, merged on every scrape (see
`orchestrator.api.observability`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import ColumnElement, Float, case, func, literal, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.api.deps import SettingsDep
from orchestrator.api.observability import request_metrics
from orchestrator.api.routers.resources import host_capacity
from orchestrator.core.config import Settings
from orchestrator.core.states import JobStatus, WorkerStatus
from orchestrator.db.models import EngineRecord, Job, ResourcePool, Worker, utcnow
from orchestrator.db.session import Database

router = APIRouter(tags=["health"])

SUBMIT_TO_RUNNING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WORKER_DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0)


def _seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    if dialect == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * literal(86400.0, Float)


async def _histogram(
    session: AsyncSession,
    name: str,
    documentation: str,
    model: Any,
    start: Any,
    end: Any,
    buckets: Sequence[float],
    label: Any,
    label_name: str,
    where: Sequence[ColumnElement[bool]],
) -> HistogramMetricFamily:
    dialect = session.get_bind().dialect.name
    seconds = _seconds_between(dialect, start, end)
    columns: list[Any] = [label, func.count(), func.coalesce(func.sum(seconds), 0.0)]
    columns += [func.sum(case((seconds <= bound, 1), else_=0)) for bound in buckets]
    rows = (
        await session.execute(
            select(*columns)
            .select_from(model)
            .where(start.is_not(None), end.is_not(None), *where)
            .group_by(label)
        )
    ).all()
    family = HistogramMetricFamily(name, documentation, labels=[label_name])
    for row in rows:
        count, total = int(row[1]), float(row[2])
        cumulative = [(_bound(b), float(row[3 + i] or 0)) for i, b in enumerate(buckets)]
        cumulative.append(("+Inf", float(count)))
        family.add_metric([str(row[0])], cumulative, total)
    return family


def _bound(value: float) -> str:
    return repr(float(value))


async def collect_database_metrics(session: AsyncSession, settings: Settings) -> list[Metric]:
    """Every system metric, read in one transaction."""
    families: list[Metric] = [
        await _by_status_and_depth(
            session, settings, "orchestrator_jobs", "Jobs by status and depth", Job, list(JobStatus)
        ),
        await _by_status_and_depth(
            session,
            settings,
            "orchestrator_workers",
            "Workers by status and depth",
            Worker,
            list(WorkerStatus),
        ),
    ]
    families += await _slots(session, settings)
    families += await _durations(session)
    families += await _agent_usage(session)
    families.append(await _live_engines(session, settings))
    return families


async def _by_status_and_depth(
    session: AsyncSession,
    settings: Settings,
    name: str,
    documentation: str,
    model: type[Job] | type[Worker],
    statuses: Sequence[JobStatus | WorkerStatus],
) -> GaugeMetricFamily:
    """A gauge with a sample for every (status, depth) pair, zero where nothing is."""
    family = GaugeMetricFamily(name, documentation, labels=["status", "depth"])
    stmt = select(model.status, model.depth, func.count()).group_by(model.status, model.depth)
    counts = {(status, depth): count for status, depth, count in (await session.execute(stmt)).all()}
    for depth in range(settings.max_depth + 1):
        for status in statuses:
            family.add_metric([status.value, str(depth)], counts.get((status.value, depth), 0))
    return family


async def _slots(session: AsyncSession, settings: Settings) -> list[Metric]:
    allocated = GaugeMetricFamily(
        "orchestrator_slots_allocated", "Slots allocated per depth", labels=["depth"]
    )
    available = GaugeMetricFamily("orchestrator_slots_available", "Slots free per depth", labels=["depth"])
    quota = GaugeMetricFamily("orchestrator_slots_max", "Quota (max workers) per depth", labels=["depth"])
    pools = (await session.execute(select(ResourcePool).order_by(ResourcePool.depth))).scalars()
    for pool in pools:
        if pool.depth > settings.max_depth:
            continue
        allocated.add_metric([str(pool.depth)], pool.allocated)
        available.add_metric([str(pool.depth)], pool.max_workers - pool.allocated)
        quota.add_metric([str(pool.depth)], pool.max_workers)
    return [allocated, available, quota]


async def _durations(session: AsyncSession) -> list[Metric]:
    submit_to_running = await _histogram(
        session,
        "orchestrator_job_submit_to_running_seconds",
        "Time from submission to the first worker running, per depth",
        Job,
        Job.created_at,
        Job.started_at,
        SUBMIT_TO_RUNNING_BUCKETS,
        Job.depth,
        "depth",
        [],
    )
    worker_duration = await _histogram(
        session,
        "orchestrator_worker_duration_seconds",
        "Run time of ended workers, by final status",
        Worker,
        Worker.started_at,
        Worker.finished_at,
        WORKER_DURATION_BUCKETS,
        Worker.status,
        "status",
        [],
    )
    return [submit_to_running, worker_duration]


async def _agent_usage(session: AsyncSession) -> list[Metric]:
    cost = CounterMetricFamily(
        "orchestrator_agent_cost_usd", "Agent cost reported by workers", labels=["agent"]
    )
    tokens = CounterMetricFamily(
        "orchestrator_agent_tokens", "Agent tokens reported by workers", labels=["agent", "kind"]
    )
    usage = (
        await session.execute(
            select(
                Worker.agent,
                func.sum(func.coalesce(Worker.result["total_cost_usd"].as_float(), 0.0))
                + func.sum(func.coalesce(Worker.result["cost_usd"].as_float(), 0.0)),
                func.sum(func.coalesce(Worker.result[("usage", "input_tokens")].as_integer(), 0)),
                func.sum(func.coalesce(Worker.result[("usage", "output_tokens")].as_integer(), 0)),
            )
            .where(Worker.result.is_not(None))
            .group_by(Worker.agent)
        )
    ).all()
    for agent, usd, tokens_in, tokens_out in usage:
        cost.add_metric([agent], float(usd or 0))
        tokens.add_metric([agent, "input"], float(tokens_in or 0))
        tokens.add_metric([agent, "output"], float(tokens_out or 0))
    return [cost, tokens]


async def _live_engines(session: AsyncSession, settings: Settings) -> Metric:
    lease = timedelta(seconds=settings.orchestrator_engine_lease_seconds)
    live = (
        await session.execute(
            select(func.count())
            .select_from(EngineRecord)
            .where(EngineRecord.heartbeat_at >= utcnow() - lease)
        )
    ).scalar_one()
    engines = GaugeMetricFamily("orchestrator_engines_live", "Engines whose heartbeat is within the lease")
    engines.add_metric([], live)
    return engines


async def host_capacity_metrics(settings: Settings) -> list[Metric]:
    """Memory-aware admission on this host, from the kernel: what a worker may still reserve."""
    found = await host_capacity(settings)
    families: list[Metric] = []
    for name, documentation, value in (
        ("available", "MemAvailable of the host, MiB", found.memory_available_mb),
        (
            "reserved",
            "Memory limits of the running workers' cgroups on the host, MiB",
            found.memory_reserved_mb,
        ),
        (
            "headroom",
            "Memory kept free by admission (ORCHESTRATOR_MEMORY_HEADROOM_MB), MiB",
            found.memory_headroom_mb,
        ),
        (
            "free_for_workers",
            "Memory a new worker's limit may take now, MiB",
            found.memory_free_for_workers_mb,
        ),
    ):
        if value is not None:
            gauge = GaugeMetricFamily(f"orchestrator_host_memory_{name}_mb", documentation, labels=["host"])
            gauge.add_metric([found.host], value)
            families.append(gauge)
    return families


class _Fixed:
    """A collector that yields metric families computed beforehand (collect() is synchronous)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    started = time.perf_counter()
    database: Database = request.app.state.db
    async with database.read_session() as session:
        families = await collect_database_metrics(session, settings)
    scrape = GaugeMetricFamily(
        "orchestrator_metrics_scrape_seconds", "Time this scrape spent in the database"
    )
    scrape.add_metric([], time.perf_counter() - started)
    families.append(scrape)
    families += await host_capacity_metrics(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    MultiProcessCollector(registry, path=str(request_metrics(settings.data_dir).directory))  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/ready",
    responses={503: {"description": "Database unreachable or no engine heartbeating"}},
)
async def ready(request: Request, settings: SettingsDep) -> JSONResponse:
    """200 when the database answers and an engine heartbeat is within the lease, else 503."""
    database: Database | None = getattr(request.app.state, "db", None)
    if database is None:
        return JSONResponse({"status": "unavailable", "reason": "starting up"}, status_code=503)
    try:
        async with database.read_session() as session:
            await session.execute(text("SELECT 1"))
            newest = (await session.execute(select(func.max(EngineRecord.heartbeat_at)))).scalar_one_or_none()
    except Exception as exc:
        reason = f"database unreachable: {type(exc).__name__}"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    lease = settings.orchestrator_engine_lease_seconds
    if newest is None:
        return JSONResponse(
            {"status": "unavailable", "reason": "no engine has ever heartbeated"}, status_code=503
        )
    if newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)
    age = (utcnow() - newest).total_seconds()
    if age > lease:
        reason = f"no engine heartbeat within the lease: newest is {age:.1f}s old (lease {lease:g}s)"
        return JSONResponse(
            {"status": "unavailable", "reason": reason, "engine_heartbeat_age_seconds": round(age, 3)},
            status_code=503,
        )
    body: dict[str, object] = {
        "status": "ready",
        "database": database.engine.dialect.name,
        "engine_heartbeat_age_seconds": round(age, 3),
    }
    seat = getattr(request.app.state, "engine_seat", None)
    if seat is not None:  # this process runs the host's engine, or stands by to (api/leadership.py)
        if seat.starting is not None and not seat.starting.done():
            # Its engine has registered (the heartbeat above may be its own) but is still starting
            # (the network guard, recovery): not ready yet, and its sandbox not known.
            reason = "starting up: this process's engine is starting"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        body["engine"] = seat.state
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:
        # Never silently unsandboxed: "on", "off" (ORCHESTRATOR_SANDBOX=off) or "unavailable" + why.
        body["sandbox"] = engine.executor.sandbox_state()
        cluster = engine.executor.cluster_state()
        if cluster is not None:  # workers on a Ray cluster: unreachable means jobs wait
            body["cluster"] = cluster
            if cluster["status"] != "connected":
                body.update(status="unavailable", reason=f"worker cluster: {cluster.get('reason')}")
                return JSONResponse(body, status_code=503)
    return JSONResponse(body)
