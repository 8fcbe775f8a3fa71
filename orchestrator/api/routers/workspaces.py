"""Workspaces API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from orchestrator.api.deps import MAX_QUERY_INT, JobsRead, SessionDep
from orchestrator.api.errors import ERROR_RESPONSES
from orchestrator.api.strict_json import StrictJsonRoute
from orchestrator.workspaces import service
from orchestrator.workspaces.schemas import WorkspaceList

router = APIRouter(
    prefix="/api/workspaces", tags=["workspaces"], responses=ERROR_RESPONSES, route_class=StrictJsonRoute
)


@router.get("", response_model=WorkspaceList)
async def list_workspaces(
    actor: JobsRead,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_QUERY_INT)] = 0,
) -> WorkspaceList:
    workspaces, total = await service.list_workspaces(session, actor, limit=limit, offset=offset)
    return WorkspaceList(workspaces=workspaces, total=total, limit=limit, offset=offset)
