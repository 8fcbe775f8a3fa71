"""Security headers on every response, a Content-Security-Policy fitted to what it serves.

* Every response: `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff`,
  `Referrer-Policy: no-referrer`, and a CSP with `frame-ancestors 'none'` (nothing may frame it).
* API answers (JSON, streams): `default-src 'none'` as well: they are never meant to render.
* The dashboard (`/`, `/static/...`): its own origin only, no inline script or style (its code is
  in /static files; `data:` images for the inline favicon).
* `/docs` and `/redoc`: FastAPI's pages load Swagger UI / ReDoc from their CDN and start them with
  an inline script. The CSP allows that CDN and exactly the inline blocks of the page being sent
  (their SHA-256, computed from the body, so a `root_path` that changes the script still matches).

Pure ASGI: only the docs pages' small HTML bodies are held to be hashed; streams pass through.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

COMMON_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
API_CSP = "default-src 'none'; frame-ancestors 'none'"
DASHBOARD_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DOCS_CDN = "https://cdn.jsdelivr.net"
DOCS_PATHS = frozenset({"/docs", "/redoc"})
DASHBOARD_PREFIXES = ("/static/",)

_COMMON = [(k.lower().encode(), v.encode()) for k, v in COMMON_HEADERS.items()]
_INLINE = re.compile(rb"<(script|style)(\s[^>]*)?>(.*?)</\1\s*>", re.DOTALL | re.IGNORECASE)


def _hash(content: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(content).digest()).decode() + "'"


def docs_csp(html: bytes) -> str:
    """The CSP for a docs page: its CDN, and the hash of each inline <script>/<style> it holds."""
    scripts, styles = [], []
    for match in _INLINE.finditer(html):
        tag, attrs, content = match.group(1).lower(), match.group(2) or b"", match.group(3)
        if tag == b"script" and b"src=" not in attrs.lower():
            scripts.append(_hash(content))
        elif tag == b"style":
            styles.append(_hash(content))
    # ReDoc styles its page from script (CSSOM, allowed) and asks Google for its fonts.
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {DOCS_CDN} {' '.join(scripts)}".rstrip(),
            f"style-src {DOCS_CDN} https://fonts.googleapis.com {' '.join(styles)}".rstrip(),
            "font-src https://fonts.gstatic.com",
            f"img-src 'self' data: {DOCS_CDN} https://fastapi.tiangolo.com",
            "connect-src 'self'",
            "worker-src blob:",
            "base-uri 'none'",
            "form-action 'none'",
            "object-src 'none'",
            "frame-ancestors 'none'",
        ]
    )


def _csp_for(path: str) -> bytes:
    if path == "/" or path.startswith(DASHBOARD_PREFIXES):
        return DASHBOARD_CSP.encode()
    return API_CSP.encode()


def _with_headers(message: Message, csp: bytes) -> Message:
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _REPLACED]
    headers += _COMMON
    headers.append((b"content-security-policy", csp))
    message["headers"] = headers
    return message


_REPLACED = frozenset({k for k, _ in _COMMON} | {b"content-security-policy"})


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in DOCS_PATHS:
            await self._docs(scope, receive, send)
            return
        csp = _csp_for(path)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = _with_headers(message, csp)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _docs(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hold the (small, unstreamed) docs page to hash its inline blocks."""
        start: Message | None = None
        chunks: list[bytes] = []

        async def hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            await send(_with_headers(start, docs_csp(body).encode()))
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hold)
