"""The web dashboard: `/` and its static assets, shipped inside the package (no build step).

The page itself needs no token; it asks for one and sends it with every API call it makes.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from orchestrator.core.errors import NotFound

router = APIRouter(include_in_schema=False)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# The page must never be stale after an upgrade, and these files are small.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The page loads its script, style and icon from here and talks to this API only: no inline
# script or style, so an injected string can run nothing.
PAGE_HEADERS = {**HEADERS, "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"}


def _asset(name: str) -> bytes:
    static = resources.files("orchestrator") / "web" / "static"
    # Only plain file names listed in the package: no paths, no dot files.
    if (
        "/" in name
        or "\\" in name
        or name.startswith(".")
        or not any(name.endswith(s) for s in CONTENT_TYPES)
    ):
        raise NotFound(f"No static file {name!r}")
    entry = static / name
    if not entry.is_file():
        raise NotFound(f"No static file {name!r}")
    return entry.read_bytes()


@router.get("/", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_asset("index.html"), headers=PAGE_HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    body = _asset(name)
    suffix = name[name.rfind(".") :]
    return Response(body, media_type=CONTENT_TYPES[suffix], headers=HEADERS)
