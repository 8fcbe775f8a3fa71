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
    job_id: str
    depth: int
    requested: int
    granted: int


class ReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(max_length=64)
    depth: int = Field(ge=0, le=1000, strict=True)


class ReleaseResponse(BaseModel):
    job_id: str
    depth: int
    released: int


class DepthUsage(BaseModel):
    depth: int
    allocated: int
    available: int
    max_workers: int


class UsageReport(BaseModel):
    usage: list[DepthUsage]
