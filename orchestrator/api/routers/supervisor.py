"""Supervisor API: workers and their metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Query
from fastapi.responses import Response

from orchestrator.api.deps import MAX_QUERY_INT, SessionDep, SupervisorRead, SupervisorWrite, UnitOfWorkDep
from orchestrator.api.errors import BAD_REQUEST, NOT_FOUND
from orchestrator.api.paging import PageDep
from orchestrator.api.routers import streams
from orchestrator.api.sse import FeedsDep
from orchestrator.api.strict_json import json_api_router
from orchestrator.core.states import WORKER_FINAL, WorkerStatus
from orchestrator.workers import service
from orchestrator.workers.schemas import LogLine, SystemMetrics, WorkerList, WorkerLogs, WorkerOut

router = json_api_router("/api/supervisor", "supervisor")


@router.get("/workers", response_model=WorkerList)
async def list_workers(
    actor: SupervisorRead,
    session: SessionDep,
    workspace_id: str | None = None,
    status: WorkerStatus | None = None,
    job_id: str | None = None,
    *,
    page: PageDep,
) -> WorkerList:
    workers, total = await service.list_workers(
        session, actor, workspace_id=workspace_id, status=status, job_id=job_id, **page.window()
    )
    return WorkerList(workers=[WorkerOut.model_validate(w) for w in workers], total=total, **page.window())


@router.get("/workers/{worker_id}", response_model=WorkerOut, responses=NOT_FOUND)
async def get_worker(worker_id: str, actor: SupervisorRead, session: SessionDep) -> WorkerOut:
    return WorkerOut.model_validate(await service.get_visible_worker(session, actor, worker_id))


@router.post(
    "/workers/{worker_id}/terminate", response_model=WorkerOut, responses={**NOT_FOUND, **BAD_REQUEST}
)
async def terminate_worker(worker_id: str, actor: SupervisorWrite, session: UnitOfWorkDep) -> WorkerOut:
    return WorkerOut.model_validate(await service.terminate(session, actor, worker_id))


@router.post("/workers/{worker_id}/pause", response_model=WorkerOut, responses={**NOT_FOUND, **BAD_REQUEST})
async def pause_worker(worker_id: str, actor: SupervisorWrite, session: UnitOfWorkDep) -> WorkerOut:
    return WorkerOut.model_validate(await service.pause(session, actor, worker_id))


@router.post("/workers/{worker_id}/resume", response_model=WorkerOut, responses={**NOT_FOUND, **BAD_REQUEST})
async def resume_worker(worker_id: str, actor: SupervisorWrite, session: UnitOfWorkDep) -> WorkerOut:
    return WorkerOut.model_validate(await service.resume(session, actor, worker_id))


@router.get(
    "/workers/{worker_id}/logs", response_model=WorkerLogs, responses={**NOT_FOUND, **streams.SSE_RESPONSES}
)
async def worker_logs(
    worker_id: str,
    actor: SupervisorRead,
    session: SessionDep,
    feeds: FeedsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_QUERY_INT, description="First line number to return")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    follow: Annotated[bool, Query(description="Stream new lines (SSE) until the worker has ended")] = False,
    last_event_id: Annotated[
        str | None, Header(description="Resume a followed stream after this line")
    ] = None,
) -> WorkerLogs | Response:
    if follow:
        worker = await service.get_visible_worker(session, actor, worker_id)
        return streams.worker_log_stream(feeds, worker, last_event_id, offset)
    worker, lines = await service.read_logs(session, actor, worker_id, offset=offset, limit=limit)
    next_offset = lines[-1].seq + 1 if lines else offset
    return WorkerLogs(
        worker_id=worker_id,
        offset=offset,
        next_offset=next_offset,
        lines=[LogLine.model_validate(line) for line in lines],
        complete=worker.status in WORKER_FINAL and not worker.holds_slot and next_offset >= worker.log_lines,
    )


@router.get("/metrics", response_model=SystemMetrics)
async def system_metrics(actor: SupervisorRead, session: SessionDep) -> SystemMetrics:
    total, by_status = await service.metrics(session)
    return SystemMetrics(total_workers=total, by_status=by_status)
