"""Resource manager API: per-depth quotas and slot allocation."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from orchestrator.api.deps import ResourcesRead, ResourcesWrite, SessionDep, SettingsDep
from orchestrator.api.errors import BAD_REQUEST, NOT_FOUND
from orchestrator.api.strict_json import json_api_router
from orchestrator.core.config import Settings
from orchestrator.executors import cgroups
from orchestrator.resources import service
from orchestrator.resources.schemas import (
    AllocateRequest,
    AllocateResponse,
    HostCapacity,
    QuotaList,
    ReleaseRequest,
    ReleaseResponse,
    UsageReport,
)

router = json_api_router("/api/resources", "resources")


@router.get("/quotas", response_model=QuotaList)
async def get_quotas(actor: ResourcesRead, session: SessionDep, settings: SettingsDep) -> QuotaList:
    return QuotaList(quotas=await service.quotas(session, settings))


@router.post("/allocate", response_model=AllocateResponse, responses={**NOT_FOUND, **BAD_REQUEST})
async def allocate(body: AllocateRequest, actor: ResourcesWrite, session: SessionDep) -> AllocateResponse:
    done = await service.allocate(session, actor, body.job_id, body.depth, body.worker_count)
    return AllocateResponse(job_id=body.job_id, depth=body.depth, requested=body.worker_count, **asdict(done))


@router.post("/release", response_model=ReleaseResponse, responses={**NOT_FOUND, **BAD_REQUEST})
async def release(body: ReleaseRequest, actor: ResourcesWrite, session: SessionDep) -> ReleaseResponse:
    done = await service.release(session, actor, body.job_id, body.depth)
    return ReleaseResponse(job_id=body.job_id, depth=body.depth, **asdict(done))


@router.get("/usage", response_model=UsageReport)
async def get_usage(actor: ResourcesRead, session: SessionDep, settings: SettingsDep) -> UsageReport:
    usage = await service.usage(session, settings)
    return UsageReport(usage=usage, capacity=await host_capacity(settings))


async def host_capacity(settings: Settings) -> HostCapacity:
    """This host's memory admission figures, read from the kernel (the same on every API process)."""
    found = await asyncio.to_thread(
        cgroups.capacity,
        settings.orchestrator_meminfo_path,
        settings.orchestrator_memory_headroom_mb,
        await asyncio.to_thread(cgroups.this_host),
    )
    return HostCapacity(
        host=found.host,
        memory_available_mb=found.available_mb,
        memory_reserved_mb=found.reserved_mb,
        workers_reserving=found.workers,
        memory_headroom_mb=found.headroom_mb,
        memory_free_for_workers_mb=found.free_mb,
    )
