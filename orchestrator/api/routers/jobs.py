"""Job orchestrator API."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, status
from fastapi.responses import Response
from pydantic import AfterValidator

from orchestrator.api.deps import (
    MAX_QUERY_INT,
    JobsRead,
    JobsSubmitter,
    JobsWrite,
    SessionDep,
    SubmitQueueDep,
    UnitOfWorkDep,
)
from orchestrator.api.errors import BAD_REQUEST, ERROR_RESPONSES, NOT_FOUND, ErrorOut
from orchestrator.api.listing_route import ListingRoute
from orchestrator.api.paging import PageDep
from orchestrator.api.routers import streams
from orchestrator.api.sse import FeedsDep
from orchestrator.api.strict_json import StrictJsonRoute
from orchestrator.core.states import JobStatus
from orchestrator.jobs import pages, service
from orchestrator.jobs.repository import JobFilter
from orchestrator.jobs.schemas import (
    DELEGATION_KEY_PATTERN,
    EventList,
    EventOut,
    JobCounts,
    JobList,
    JobOut,
    JobSubmit,
    JobUsage,
)

router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=ERROR_RESPONSES, route_class=StrictJsonRoute)


@router.post(
    "/submit",
    response_model=JobOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        **NOT_FOUND,
        **BAD_REQUEST,
        409: {"model": ErrorOut, "description": "The parent has a child with this delegation_key"},
    },
)
async def submit_job(body: JobSubmit, actor: JobsSubmitter, queue: SubmitQueueDep) -> JobOut:
    # Committed when it answers; concurrent submits of this process share the transaction
    # (jobs/group_commit.py), each with its own answer. (No docstring: it would be the
    # operation's description in openapi.json.)
    job = await service.submit_grouped(queue, actor, body)
    return JobOut.model_validate(job)


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _utc(value: datetime | None) -> datetime | None:
    """A time without a zone is UTC, as every time the API returns is."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


Text = Annotated[str | None, AfterValidator(_no_nul)]
Time = Annotated[datetime | None, AfterValidator(_utc)]


async def job_filter(
    depth: Annotated[int | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
    status: JobStatus | None = None,
    parent_job_id: Annotated[Text, Query(max_length=64)] = None,
    agent: Annotated[Text, Query(max_length=64, description="Only jobs of this agent profile")] = None,
    repository: Annotated[Text, Query(max_length=4096, description="Only jobs on this repository")] = None,
    created_after: Annotated[Time, Query(description="Created at or after (UTC if no zone)")] = None,
    created_before: Annotated[Time, Query(description="Created before this time (UTC if no zone)")] = None,
    q: Annotated[
        Text, Query(max_length=200, description="Search the ids and task texts (case-insensitive, literal)")
    ] = None,
    root_only: Annotated[
        bool, Query(description="Only the roots of job trees (a worker token: its own job)")
    ] = False,
) -> JobFilter:
    return JobFilter(
        depth=depth,
        status=status.value if status else None,
        parent_job_id=parent_job_id,
        agent=agent,
        repository=repository,
        created_after=created_after,
        created_before=created_before,
        q=q or None,
        root_only=root_only,
    )


JobFilterDep = Annotated[JobFilter, Depends(job_filter)]


async def list_jobs(
    actor: JobsRead,
    session: SessionDep,
    where: JobFilterDep,
    page: PageDep,
    delegation_key: Annotated[
        str | None,
        Query(
            pattern=DELEGATION_KEY_PATTERN,
            description="Only the jobs submitted with this delegation_key (with parent_job_id: at most one)",
        ),
    ] = None,
) -> Response:
    if delegation_key is not None:
        where = replace(where, delegation_key=delegation_key)
    # JSON bytes of plain rows, not JobList models validated and dumped again (jobs/pages.py):
    # the same body, byte for byte; `response_model` still documents it.
    body = await service.list_jobs_json(session, actor, where, limit=page.limit, offset=page.offset)
    return Response(body, media_type="application/json")


# The list's plain case (a user's token, at most limit and offset) skips dependency solving
# (api/listing_route.py); its documentation is the route's as declared.
router.add_api_route(
    "", list_jobs, methods=["GET"], response_model=JobList, route_class_override=ListingRoute
)


@router.get("/counts", response_model=JobCounts)
async def count_jobs(actor: JobsRead, session: SessionDep, where: JobFilterDep) -> JobCounts:
    """Jobs per status under the list's filters (its `status` ignored): the dashboard's counts."""
    counts = await service.count_jobs(session, actor, where)
    return JobCounts(counts=counts, total=sum(counts.values()))


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: str, actor: JobsRead, session: SessionDep) -> Response:
    # JSON bytes of the row, as the list's (jobs/pages.py); `response_model` documents it.
    return Response(await pages.job_json(session, actor, job_id), media_type="application/json")


@router.get("/{job_id}/usage", response_model=JobUsage, responses=NOT_FOUND)
async def job_usage(job_id: str, actor: JobsRead, session: SessionDep) -> JobUsage:
    """Cost and tokens of the job's whole subtree, per worker, and what is left of its budget."""
    return await service.usage(session, actor, job_id)


@router.post("/{job_id}/cancel", response_model=JobOut, responses={**NOT_FOUND, **BAD_REQUEST})
async def cancel_job(job_id: str, actor: JobsWrite, session: UnitOfWorkDep) -> JobOut:
    return JobOut.model_validate(await service.cancel(session, actor, job_id))


@router.get("/{job_id}/events", response_model=EventList, responses={**NOT_FOUND, **streams.SSE_RESPONSES})
async def job_events(
    job_id: str,
    actor: JobsRead,
    session: SessionDep,
    feeds: FeedsDep,
    after_id: Annotated[int, Query(ge=0, le=2**63 - 1, description="Return events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    follow: Annotated[
        bool, Query(description="Stream the subtree's events and log lines (SSE) until it is final")
    ] = False,
    last_event_id: Annotated[str | None, Header(description="Resume a followed stream after this id")] = None,
) -> EventList | Response:
    if follow:
        job = await service.get_visible_job(session, actor, job_id)
        return streams.job_event_stream(feeds, job, last_event_id, after_id)
    events = await service.events(session, actor, job_id, after_id=after_id, limit=limit)
    return EventList(job_id=job_id, events=[EventOut.model_validate(e) for e in events])
