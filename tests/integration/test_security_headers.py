"""Issue 20 item 12: every answer carries X-Frame-Options, a CSP with frame-ancestors 'none',
nosniff and Referrer-Policy; the dashboard gets a CSP of its own origin without 'unsafe-inline';
/docs and /redoc one that allows their CDN and exactly the inline blocks of the page served.
(tests/web/test_csp.py loads the pages in Chromium and fails on any CSP violation.)"""

from __future__ import annotations

import base64
import hashlib
import re

import httpx
import pytest

from tests.support.servers import Server, token

COMMON = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def directives(csp: str) -> dict[str, list[str]]:
    parsed = {}
    for part in csp.split(";"):
        words = part.split()
        if words:
            parsed[words[0]] = words[1:]
    return parsed


def check_common(response: httpx.Response) -> dict[str, list[str]]:
    for name, value in COMMON.items():
        assert response.headers.get(name) == value, (response.request.url, name, response.headers)
    csp = response.headers.get("content-security-policy")
    assert csp, (response.request.url, response.headers)
    assert response.headers.get_list("content-security-policy") == [csp]
    parsed = directives(csp)
    assert parsed["frame-ancestors"] == ["'none'"], csp
    return parsed


def test_every_answer_carries_the_headers(shared_server: Server) -> None:
    auth = {"Authorization": f"Bearer {token()}"}
    url = shared_server.url
    answers = [
        httpx.get(f"{url}/health"),
        httpx.get(f"{url}/openapi.json"),
        httpx.get(f"{url}/metrics", headers=auth),
        httpx.get(f"{url}/api/jobs", headers=auth),
        httpx.get(f"{url}/api/jobs"),  # 401
        httpx.get(f"{url}/api/jobs/j_missing", headers=auth),  # 404
        httpx.post(f"{url}/api/jobs/submit", headers=auth, json={}),  # 422
        httpx.post(f"{url}/api/jobs/submit", headers=auth, content=b"{", timeout=30),  # bad JSON
        httpx.get(f"{url}/nowhere"),
        httpx.get(f"{url}/health", headers={"X-Pad": "p" * 70_000}),  # 431
        httpx.post(f"{url}/api/jobs/submit", content=b" " * (3 * 1024 * 1024), timeout=60),  # 413
        httpx.post(f"{url}/mcp/", json={}),
    ]
    statuses = sorted({a.status_code for a in answers})
    assert {200, 401, 404, 413, 422, 431} <= set(statuses), statuses
    for answer in answers:
        parsed = check_common(answer)
        assert parsed["default-src"] == ["'none'"], (answer.request.url, parsed)
    job = httpx.post(f"{url}/api/jobs/submit", headers=auth, json={"task_description": "t"}).json()
    with httpx.stream(
        "GET", f"{url}/api/jobs/{job['id']}/events?follow=true", headers=auth, timeout=30
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        check_common(stream)


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css"])
def test_the_dashboard_may_use_its_own_origin_only(shared_server: Server, path: str) -> None:
    response = httpx.get(f"{shared_server.url}{path}")
    assert response.status_code == 200
    parsed = check_common(response)
    assert parsed["default-src"] == ["'self'"]
    csp = response.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp, csp
    assert "script-src" not in parsed and "style-src" not in parsed  # default-src 'self' governs


def test_the_dashboard_page_has_no_inline_code(shared_server: Server) -> None:
    html = httpx.get(f"{shared_server.url}/").text
    assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", html), "inline <script>"
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)


def sha256(content: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(content.encode()).digest()).decode() + "'"


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_allow_their_cdn_and_exactly_their_inline_scripts(shared_server: Server, path: str) -> None:
    response = httpx.get(f"{shared_server.url}{path}")
    assert response.status_code == 200
    parsed = check_common(response)
    html = response.text
    inline = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert inline or path == "/redoc", html  # ReDoc's page starts from its <redoc> element
    scripts = parsed["script-src"]
    assert "https://cdn.jsdelivr.net" in scripts
    assert sorted(s for s in scripts if s.startswith("'sha256-")) == sorted(sha256(s) for s in inline)
    assert "'unsafe-inline'" not in scripts and "'unsafe-eval'" not in scripts
    for block in re.findall(r"<style>(.*?)</style>", html, re.DOTALL):
        assert sha256(block) in parsed["style-src"]
