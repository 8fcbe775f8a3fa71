"""The `limit`/`offset` query parameters of every list endpoint, declared once: the same bounds,
defaults and 422 messages on jobs, workers and workspaces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypedDict

from fastapi import Depends, Query

from orchestrator.api.deps import MAX_QUERY_INT

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


class Window(TypedDict):
    limit: int
    offset: int


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int

    def window(self) -> Window:
        """`limit=` and `offset=`: what a list service is asked for, and what its list body echoes."""
        return Window(limit=self.limit, offset=self.offset)


async def page(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    offset: Annotated[int, Query(ge=0, le=MAX_QUERY_INT)] = 0,
) -> Page:
    return Page(limit=limit, offset=offset)


PageDep = Annotated[Page, Depends(page)]
