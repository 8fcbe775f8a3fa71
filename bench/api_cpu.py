"""CPU per request, in-process, for when the machine is too loaded for wrk's figures to mean much.

    .venv/bin/python bench/api_cpu.py [--requests 2000] [--compare DIR]

Drives the ASGI apps directly (httpx's ASGITransport, no sockets) and reads the process's CPU
time (`time.process_time`), which other processes' load does not inflate the way wall-clock
throughput is. Our `GET /health`, `POST /api/jobs/submit` (SQLite, engine off; one at a time,
and 32 at once: concurrent submits share transactions, jobs/group_commit.py) and
`GET /api/jobs?limit=50` (1,000 jobs) against the same bare FastAPI app as bench/api.py, in
rounds that alternate, so both see the same machine. The client's own CPU is in every figure
(httpx, the same for each app): compare the differences, not the ratios alone.

`--compare DIR` runs the same measurement in a subprocess with DIR (another version's
`orchestrator` package, e.g. from `git archive`) first on the import path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


async def per_request_ms(client: Any, method: str, path: str, count: int, body: Any = None) -> float:
    started = time.process_time()
    for _ in range(count):
        response = await client.request(method, path, json=body)
        assert response.status_code < 300, response.text
    return 1000 * (time.process_time() - started) / count


async def concurrent_ms(client: Any, path: str, count: int, body: Any, concurrency: int = 32) -> float:
    """CPU per request with `concurrency` requests in flight at once (submits group-commit)."""

    async def one_loop(n: int) -> None:
        for _ in range(n):
            response = await client.post(path, json=body)
            assert response.status_code < 300, response.text

    started = time.process_time()
    await asyncio.gather(*(one_loop(count // concurrency) for _ in range(concurrency)))
    return 1000 * (time.process_time() - started) / (count // concurrency * concurrency)


async def run(requests: int) -> dict[str, float]:
    import httpx
    from fastapi import FastAPI
    from pydantic import BaseModel

    data = Path(tempfile.mkdtemp(prefix="bench-api-cpu-"))
    os.environ.update(
        {
            "DATABASE_URL": f"sqlite:///{data / 'o.db'}",
            "ORCHESTRATOR_DATA_DIR": str(data),
            "ORCHESTRATOR_ENGINE": "false",
            "SECRET_KEY": "bench-api-cpu-secret-key-0123456789abcdef",
        }
    )
    from orchestrator.api.main import create_app
    from orchestrator.core.auth import ALL_SCOPES, create_access_token

    class Health(BaseModel):
        status: str
        database: str

    bare = FastAPI()

    @bare.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", database="none")

    app = create_app()
    headers = {"Authorization": f"Bearer {create_access_token('bench', ALL_SCOPES)}"}
    rounds: dict[str, list[float]] = {
        "bare /health": [],
        "/health": [],
        "submit": [],
        "submit, 32 at once": [],
        "list": [],
    }
    async with app.router.lifespan_context(app):
        ours = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a", headers=headers)
        base = httpx.AsyncClient(transport=httpx.ASGITransport(app=bare), base_url="http://b")
        async with ours, base:
            for _ in range(1000):
                await ours.post("/api/jobs/submit", json={"task_description": "seed"})
            per_round = max(requests // 5, 1)
            for _ in range(5):
                rounds["bare /health"].append(await per_request_ms(base, "GET", "/health", per_round))
                rounds["/health"].append(await per_request_ms(ours, "GET", "/health", per_round))
                rounds["submit"].append(
                    await per_request_ms(
                        ours, "POST", "/api/jobs/submit", per_round, {"task_description": "x"}
                    )
                )
                rounds["submit, 32 at once"].append(
                    await concurrent_ms(ours, "/api/jobs/submit", per_round, {"task_description": "x"})
                )
                rounds["list"].append(await per_request_ms(ours, "GET", "/api/jobs?limit=50", per_round // 4))
    return {name: statistics.median(values) for name, values in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for name, value in asyncio.run(run(args.requests)).items():
            print(f"{name}\t{value:.3f}")
        return
    versions = {"this": str(ROOT)} | ({"compared": str(args.compare)} if args.compare else {})
    with open("/proc/loadavg") as handle:
        print(f"load average: {handle.read().split()[:3]}")
    results: dict[str, dict[str, str]] = {}
    for label, path in versions.items():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, str(ROOT)])}
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--requests", str(args.requests)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[label] = dict(line.split("\t") for line in out.strip().splitlines())
    print("CPU ms per request (median of 5 rounds, client included)")
    for name in results["this"]:
        row = "  ".join(f"{label} {values[name]:>7}" for label, values in results.items())
        print(f"  {name:14} {row}")


if __name__ == "__main__":
    main()
