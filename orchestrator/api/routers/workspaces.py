"""Workspaces API."""

from __future__ import annotations

from orchestrator.api.deps import JobsRead, SessionDep
from orchestrator.api.paging import PageDep
from orchestrator.api.strict_json import json_api_router
from orchestrator.workspaces import service
from orchestrator.workspaces.schemas import WorkspaceList

router = json_api_router("/api/workspaces", "workspaces")


@router.get("", response_model=WorkspaceList)
async def list_workspaces(
    actor: JobsRead,
    session: SessionDep,
    page: PageDep,
) -> WorkspaceList:
    workspaces, total = await service.list_workspaces(session, actor, **page.window())
    return WorkspaceList(workspaces=workspaces, total=total, **page.window())
