"""`orchestrator serve --log-format json`: one JSON object per line, each with the request id."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.servers import ServerFactory, free_port
from tests.support.wait import wait_until


def test_serve_json_logs_carry_the_request_id(servers: ServerFactory) -> None:
    port = free_port()
    env = servers.base_env(ORCHESTRATOR_PUBLIC_URL=f"http://127.0.0.1:{port}")
    stderr_path = servers.root / "serve.err"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "orchestrator"),
                "serve",
                "--port",
                str(port),
                "--log-format",
                "json",
            ],
            cwd=servers.root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            url = f"http://127.0.0.1:{port}"

            def healthy() -> bool:
                try:
                    return httpx.get(f"{url}/health", timeout=10).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, timeout=30, what="serve to answer")
            response = httpx.get(f"{url}/api/jobs", headers={"X-Request-ID": "req-12345"})
            assert response.status_code == 401
            assert response.headers["X-Request-ID"] == "req-12345"
            wait_until(lambda: "req-12345" in stderr_path.read_text(), timeout=10, what="the access line")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(20)
    lines = [line for line in stderr_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    tagged = [r for r in records if r.get("request_id") == "req-12345"]
    assert tagged, records
    assert all({"message", "level"} <= set(r) for r in records)


def test_serve_rejects_an_unknown_log_format(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "orchestrator"), "serve", "--log-format", "xml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "--log-format must be text or json" in done.stderr
    assert "Traceback" not in done.stderr
