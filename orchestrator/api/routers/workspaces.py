"""Workspaces API."""

from __future__ import annotations

from fastapi import APIRouter

from orchestrator.api.deps import JobsRead, SessionDep
from orchestrator.api.errors import ERROR_RESPONSES
from orchestrator.api.paging import PageDep
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
    page: PageDep,
) -> WorkspaceList:
    workspaces, total = await service.list_workspaces(session, actor, limit=page.limit, offset=page.offset)
    return WorkspaceList(workspaces=workspaces, total=total, limit=page.limit, offset=page.offset)
