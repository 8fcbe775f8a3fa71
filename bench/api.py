"""API throughput and latency with a native load generator, side by side in one run (targets live
here and in docs/BENCHMARKS.md, never in tests).

    .venv/bin/python bench/api.py [--seconds 5] [--connections 32] [--databases sqlite,postgres]
                                  [--processes 1,2,4] [--engine off,on] [--seed 100000]
                                  [--compare DIR] [--list-connections 32,4]

`--compare DIR`: DIR holds another version's `orchestrator` package (e.g. `git archive <commit>
orchestrator | tar -x -C DIR`); every configuration is then measured with it too, right after
this checkout's, so the two columns share the machine's load of the moment.

Needs `wrk` (Debian package; `make bench-api` installs it). For each database, number of
processes and engine setting, a real `uvicorn orchestrator.api.main:app` is started and measured:

* `GET /health` (and, once per run, the same route of a bare FastAPI app: the framework's cost);
* `POST /api/jobs/submit` with a user token (wrk Lua script), then a count of the jobs stored
  against the 2xx responses wrk saw (nothing lost or duplicated);
* `GET /api/jobs?limit=50` after 100,000 finished jobs were written to the table.

With the engine on, every submitted job runs `sleep 600` (an agent profile), so the depth-0 quota
fills and the rest queue behind it: the engine works (claims, passes, wake-ups) while the API is
measured, but the agents cost nothing. wrk runs with 2 threads on this same 2-core machine, so
every figure includes the load generator's share of the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine import profiles  # noqa: E402
from tests.support.servers import TEST_SECRET_KEY, Server, free_port, server_factory, token  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY  # tokens made here must verify in the servers

BARE_APP = """
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Health(BaseModel):
    status: str
    database: str


@app.get("/health", response_model=Health)
async def health() -> Health:
    return Health(status="ok", database="none")
"""

SUBMIT_LUA = """
wrk.method = "POST"
wrk.body = '{"task_description": "bench submit"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    errors: int

    def row(self) -> str:
        extra = f" non-2xx {self.non_2xx}" if self.non_2xx else ""
        extra += f" errors {self.errors}" if self.errors else ""
        return f"{self.rps:8.0f} req/s  p50 {self.p50_ms:7.1f} ms  p99 {self.p99_ms:7.1f} ms{extra}"


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(
    url: str, seconds: float, connections: int, *, script: Path | None = None, header: str = ""
) -> WrkResult:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    if header:
        argv += ["-H", header]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    latency = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", out, re.M))
    if "50" not in latency:  # no request completed
        raise RuntimeError(f"wrk measured nothing:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(latency["50"]),
        p99_ms=_ms(latency["99"]),
        requests=requests,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def bare_fastapi(root: Path, processes: int) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bare_app.py").write_text(BARE_APP)
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "warning"]
    if processes > 1:
        argv += ["--workers", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return Server(root=root, port=port, env=env, argv=argv).start()


def seed_jobs(database_url: str, count: int) -> None:
    """`count` finished jobs written straight to the table (the API would take minutes)."""
    from sqlalchemy import insert

    from orchestrator.core.config import Settings
    from orchestrator.db.models import Job
    from orchestrator.db.session import Database

    async def run() -> None:
        database = Database(Settings(database_url=database_url))
        start = datetime.now(UTC) - timedelta(days=30)
        try:
            for chunk in range(0, count, 5000):
                rows = []
                for i in range(chunk, min(count, chunk + 5000)):
                    job_id = f"j_seed{i:010d}"
                    at = start + timedelta(seconds=i)
                    rows.append(
                        {
                            "id": job_id,
                            "status": "COMPLETED",
                            "task_description": f"seeded job {i}",
                            "worker_count": 1,
                            "depth": 0,
                            "parent_job_id": None,
                            "path": f"{job_id}/",
                            "priority": 0,
                            "agent": "simulated",
                            "agent_options": {},
                            "created_by": "bench",
                            "created_at": at,
                            "updated_at": at,
                            "finished_at": at,
                        }
                    )
                async with database.session() as session:
                    await session.execute(insert(Job), rows)
        finally:
            await database.dispose()
        if database_url.startswith("postgresql"):
            # Settle the bulk load as an operator would (and as autovacuum does, a while later), so
            # every configuration lists from the same analysed table, not one that autovacuum may
            # or may not have reached yet.
            import asyncpg

            connection = await asyncpg.connect(database_url)
            try:
                await connection.execute("VACUUM ANALYZE jobs")
            finally:
                await connection.close()

    asyncio.run(run())


def stored_jobs(server: Server) -> int:
    with server.client() as client:
        return int(client.get("/api/jobs", params={"limit": 1}).json()["total"])


def measure(
    root: Path,
    database: str,
    processes: int,
    engine: bool,
    args: argparse.Namespace,
    results: list[dict[str, object]],
    code: Path | None = None,
) -> None:
    """One configuration, on this checkout's code or (`code`) on another version's."""
    os.environ["TEST_DATABASE"] = database
    root.mkdir(parents=True)
    extra = {"ORCHESTRATOR_ENGINE": "true" if engine else "false"}
    if engine:
        extra |= {"ORCHESTRATOR_AGENTS_FILE": profiles(root), "ORCHESTRATOR_DEFAULT_AGENT": "sleep"}
    if code is not None:
        extra["PYTHONPATH"] = str(code)
    label = (
        f"{'compared' if code else 'this':8} {database:8} {processes}p engine {'on ' if engine else 'off'}"
    )
    with server_factory(root) as servers:
        api = servers.make(workers=processes, **extra).start(timeout=120)  # slow to start under load
        auth = f"Authorization: Bearer {token()}"
        script = root / "submit.lua"
        script.write_text(SUBMIT_LUA % token())

        health = wrk(f"{api.url}/health", args.seconds, args.connections)
        print(f"{label}  GET /health          {health.row()}", flush=True)

        before = stored_jobs(api)
        submit = wrk(f"{api.url}/api/jobs/submit", args.seconds, args.connections, script=script)
        stored = stored_jobs(api) - before
        accepted = submit.requests - submit.non_2xx
        # wrk stops counting at the deadline with up to one request per connection in flight:
        # those are stored too, so stored is accepted .. accepted + connections.
        print(f"{label}  POST /api/jobs/submit {submit.row()}  stored {stored}, 2xx {accepted}", flush=True)

        seed_jobs(servers.database_url(), args.seed)
        # The first second after the seeding is reported apart: a transient while the processes'
        # caches and PostgreSQL's fill after the bulk load (its p99 is several times that of the
        # seconds after it, also when a lighter warm-up filled the pools), not the steady state
        # the targets are about.
        first = wrk(
            f"{api.url}/api/jobs?limit=50",
            1,
            max(int(c) for c in args.list_connections.split(",")),
            header=auth,
        )
        print(f"{label}  GET /api/jobs?limit=50 {first.row()}  (first second, cold)", flush=True)
        listings: dict[object, object] = {"first_second": vars(first)}
        for connections in (int(c) for c in args.list_connections.split(",")):
            listing = wrk(f"{api.url}/api/jobs?limit=50", args.seconds, connections, header=auth)
            listings[connections] = vars(listing)
            print(f"{label}  GET /api/jobs?limit=50 {listing.row()}  ({connections} connections)", flush=True)
        results.append(
            {
                "code": str(code) if code else "this",
                "database": database,
                "processes": processes,
                "engine": engine,
                "health": vars(health),
                "submit": vars(submit) | {"stored": stored, "accepted": accepted},
                "list": listings,
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--engine", default="off,on")
    parser.add_argument("--seed", type=int, default=100_000)
    parser.add_argument("--list-connections", default="32,4")
    parser.add_argument("--compare", type=Path, help="another version's orchestrator package's parent")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/api.py needs wrk: apt-get install -y wrk (or make bench-api)")
    with open("/proc/loadavg") as handle:
        print(f"load average at start: {handle.read().split()[:3]}", flush=True)
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        root = Path(tmp)
        bare = bare_fastapi(root / "bare", 1)
        try:
            base = wrk(f"{bare.url}/health", args.seconds, args.connections)
            print(f"bare FastAPI 1p       GET /health          {base.row()}", flush=True)
        finally:
            bare.stop()
        results.append({"bare_fastapi": vars(base)})
        measure_databases(root, args, results)
        bare = bare_fastapi(root / "bare-again", 1)
        try:
            again = wrk(f"{bare.url}/health", args.seconds, args.connections)
            print(
                f"bare FastAPI 1p       GET /health          {again.row()}  (again, at the end)", flush=True
            )
        finally:
            bare.stop()
        results.append({"bare_fastapi_at_end": vars(again)})
    with open("/proc/loadavg") as handle:
        print(f"load average at end: {handle.read().split()[:3]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def measure_databases(root: Path, args: argparse.Namespace, results: list[dict[str, object]]) -> None:
    for database in args.databases.split(","):
        for processes in (int(p) for p in args.processes.split(",")):
            for engine in args.engine.split(","):
                for code in [None, args.compare] if args.compare else [None]:
                    run = root / f"{database}-{processes}-{engine}-{time.monotonic_ns()}"
                    measure(run, database, processes, engine == "on", args, results, code)


if __name__ == "__main__":
    main()
