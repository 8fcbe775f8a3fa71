"""The /mcp/ endpoint serves the delegation tools to worker tokens only."""

from __future__ import annotations

import httpx

from tests.support.servers import Server, token

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def test_mcp_endpoint_refuses_missing_bad_and_non_worker_tokens(shared_server: Server) -> None:
    url = f"{shared_server.url}/mcp/"
    missing = httpx.post(url, json=INITIALIZE, headers=HEADERS)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    bad = httpx.post(url, json=INITIALIZE, headers={**HEADERS, "Authorization": "Bearer nope"})
    assert bad.status_code == 401 and "Invalid token" in bad.json()["detail"]
    user = httpx.post(url, json=INITIALIZE, headers={**HEADERS, "Authorization": f"Bearer {token()}"})
    assert user.status_code == 403 and "worker" in user.json()["detail"]
