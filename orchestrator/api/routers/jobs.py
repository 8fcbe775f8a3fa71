"""Job orchestrator API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import Response

from orchestrator.api.deps import MAX_QUERY_INT, AgentsDep, JobsRead, JobsWrite, SessionDep, SettingsDep
from orchestrator.api.errors import BAD_REQUEST, ERROR_RESPONSES, NOT_FOUND
from orchestrator.api.routers import streams
from orchestrator.core.states import JobStatus
from orchestrator.jobs import service
from orchestrator.jobs.schemas import EventList, EventOut, JobList, JobOut, JobSubmit, JobUsage

router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


@router.post(
    "/submit",
    response_model=JobOut,
    status_code=status.HTTP_201_CREATED,
    responses={**NOT_FOUND, **BAD_REQUEST},
)
async def submit_job(
    body: JobSubmit, actor: JobsWrite, session: SessionDep, settings: SettingsDep, agents: AgentsDep
) -> JobOut:
    job = await service.submit(session, settings, actor, body, agents.validate, agents.validate_limits)
    return JobOut.model_validate(job)


@router.get("", response_model=JobList)
async def list_jobs(
    actor: JobsRead,
    session: SessionDep,
    depth: Annotated[int | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
    status: JobStatus | None = None,
    parent_job_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_QUERY_INT)] = 0,
) -> JobList:
    jobs, total = await service.list_jobs(
        session, actor, depth=depth, status=status, parent_job_id=parent_job_id, limit=limit, offset=offset
    )
    return JobList(jobs=[JobOut.model_validate(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: str, actor: JobsRead, session: SessionDep) -> JobOut:
    return JobOut.model_validate(await service.get_visible_job(session, actor, job_id))


@router.get("/{job_id}/usage", response_model=JobUsage, responses=NOT_FOUND)
async def job_usage(job_id: str, actor: JobsRead, session: SessionDep) -> JobUsage:
    """Cost and tokens of the job's whole subtree, per worker, and what is left of its budget."""
    return await service.usage(session, actor, job_id)


@router.post("/{job_id}/cancel", response_model=JobOut, responses={**NOT_FOUND, **BAD_REQUEST})
async def cancel_job(job_id: str, actor: JobsWrite, session: SessionDep) -> JobOut:
    return JobOut.model_validate(await service.cancel(session, actor, job_id))


@router.get("/{job_id}/events", response_model=EventList, responses={**NOT_FOUND, **streams.SSE_RESPONSES})
async def job_events(
    job_id: str,
    actor: JobsRead,
    session: SessionDep,
    request: Request,
    after_id: Annotated[int, Query(ge=0, le=2**63 - 1, description="Return events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    follow: Annotated[
        bool, Query(description="Stream the subtree's events and log lines (SSE) until it is final")
    ] = False,
    last_event_id: Annotated[str | None, Header(description="Resume a followed stream after this id")] = None,
) -> EventList | Response:
    if follow:
        job = await service.get_visible_job(session, actor, job_id)
        return streams.job_event_stream(request.app.state.db, job, last_event_id, after_id)
    events = await service.events(session, actor, job_id, after_id=after_id, limit=limit)
    return EventList(job_id=job_id, events=[EventOut.model_validate(e) for e in events])
