"""Job orchestrator API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from orchestrator.api.deps import AgentsDep, JobsRead, JobsWrite, SessionDep, SettingsDep
from orchestrator.api.errors import BAD_REQUEST, ERROR_RESPONSES, NOT_FOUND
from orchestrator.core.states import JobStatus
from orchestrator.jobs import service
from orchestrator.jobs.schemas import EventList, EventOut, JobList, JobOut, JobSubmit

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
    job = await service.submit(session, settings, actor, body, agents.validate)
    return JobOut.model_validate(job)


@router.get("", response_model=JobList)
async def list_jobs(
    actor: JobsRead,
    session: SessionDep,
    depth: Annotated[int | None, Query(ge=0)] = None,
    status: JobStatus | None = None,
    parent_job_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    jobs, total = await service.list_jobs(
        session, actor, depth=depth, status=status, parent_job_id=parent_job_id, limit=limit, offset=offset
    )
    return JobList(jobs=[JobOut.model_validate(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: str, actor: JobsRead, session: SessionDep) -> JobOut:
    return JobOut.model_validate(await service.get_visible_job(session, actor, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses={**NOT_FOUND, **BAD_REQUEST})
async def cancel_job(job_id: str, actor: JobsWrite, session: SessionDep) -> JobOut:
    return JobOut.model_validate(await service.cancel(session, actor, job_id))


@router.get("/{job_id}/events", response_model=EventList, responses=NOT_FOUND)
async def job_events(
    job_id: str,
    actor: JobsRead,
    session: SessionDep,
    after_id: Annotated[int, Query(ge=0, description="Return events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> EventList:
    events = await service.events(session, actor, job_id, after_id=after_id, limit=limit)
    return EventList(job_id=job_id, events=[EventOut.model_validate(e) for e in events])
