"""Bodies of the resource manager API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Quota(BaseModel):
    depth: int
    max_workers: int


class QuotaList(BaseModel):
    quotas: list[Quota]


class AllocateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(max_length=64)
    depth: int = Field(ge=0, le=1000, strict=True)
    worker_count: int = Field(ge=1, le=10_000, strict=True)


class AllocateResponse(BaseModel):
    """The guide's four fields, then extensions. Allocate is idempotent: `granted` is what the job
    holds for this request, whoever took the slots (this call, an earlier one, or the engine for
    the job's workers)."""

    job_id: str
    depth: int
    requested: int
    granted: int = Field(
        description="Slots the job holds for this request: min(requested, held); "
        "never more than its worker_count or the depth's quota"
    )
    newly_allocated: int = Field(description="Slots this call took from the depth's pool")
    bound_to_workers: int = Field(description="Slots of the job its running workers hold")
    held: int = Field(description="All slots the job holds after this call")


class ReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(max_length=64)
    depth: int = Field(ge=0, le=1000, strict=True)


class ReleaseResponse(BaseModel):
    """The guide's three fields, then extensions: what stays bound, and why the answer is what it is."""

    job_id: str
    depth: int
    released: int = Field(description="Slots returned to the depth's pool by this call")
    still_bound: int = Field(description="Slots the job's running workers keep until they end")
    reason: str = Field(description="Why this much (or nothing) was released")


class DepthUsage(BaseModel):
    depth: int
    allocated: int
    available: int
    max_workers: int


class HostCapacity(BaseModel):
    """Memory-aware admission on the host that answered (extension)."""

    host: str
    memory_available_mb: int | None = Field(description="MemAvailable of the host")
    memory_reserved_mb: int | None = Field(
        description="Memory limits of the running workers' cgroups on this host (null: no cgroups)"
    )
    workers_reserving: int | None = Field(description="Running workers whose limits are counted")
    memory_headroom_mb: int = Field(description="ORCHESTRATOR_MEMORY_HEADROOM_MB, kept free")
    memory_free_for_workers_mb: int | None = Field(
        description="What a new worker's memory limit may take now: available - reserved - headroom"
    )


class UsageReport(BaseModel):
    usage: list[DepthUsage]
    capacity: HostCapacity | None = Field(
        default=None, description="This host's memory admission (extension)"
    )
