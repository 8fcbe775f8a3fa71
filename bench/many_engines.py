"""Many engines on one PostgreSQL database, measured (issue 16, part 3).

    TMPDIR=/dev/shm .venv/bin/python bench/many_engines.py [--jobs 10000] [--engines 4] [--apis 2]
        [--concurrency 10] [--sleepers 2000] [--only throughput|sleepers]

1. N one-worker `true` jobs queued through the API processes (ORCHESTRATOR_ENGINE=false) with no
   engine running, then E `orchestrator engine` processes started together run them all: total time
   (first worker start to last job end, server timestamps), each engine's share and CPU; checked
   from the database: every job COMPLETED with exactly one worker started exactly once, and a
   sampler (one snapshot every 20 ms) never saw more workers holding a slot, or RUNNING, at a depth
   than its quota. Side by side, the same N `true`s spawned directly at the same concurrency.
2. S concurrently sleeping workers (`sleep 600`, depth-0 quota raised to S) over the E engines: each
   engine's CPU (utime + stime from /proc) over a window while they all sleep, in % of one core.

Each part has a database of its own on the PostgreSQL at TEST_PG_ADMIN_URL (default
postgres@127.0.0.1:5432), dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["TEST_DATABASE"] = "postgres"  # several engine processes need a shared server database

from bench.engine import CLK_TCK, direct_baseline, sandboxed_baseline  # noqa: E402
from tests.support.fleet import QuotaSampler, audit, count_status, engines, pg_dsn  # noqa: E402
from tests.support.servers import TEST_SECRET_KEY, server_factory, token  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY

# The sleepers' memory limit is small on purpose: memory-aware admission reserves each worker's
# limit (1 GiB by default) against the host's available memory, per engine, so 2,000 workers at the
# default would wait for memory, not run. `sleep` needs a few MiB.
PROFILE = """
[agents.true]
command = ["true"]
[agents.sleep]
command = ["sleep", "600"]
memory_mb = 16
pids = 16
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def submit_spread(urls: list[str], count: int, body: dict[str, object], concurrency: int = 16) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token()}"}
    clients = [httpx.AsyncClient(base_url=url, headers=headers, timeout=120) for url in urls]
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with semaphore:
            response = await clients[index % len(clients)].post("/api/jobs/submit", json=body)
            response.raise_for_status()

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients:
            await client.aclose()


def wait_for(predicate: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


def workers_in(url: str, status: str) -> int:
    async def _count() -> int:
        import asyncpg

        conn = await asyncpg.connect(pg_dsn(url))
        try:
            return int(await conn.fetchval("SELECT count(*) FROM workers WHERE status = $1", status))
        finally:
            await conn.close()

    return asyncio.run(_count())


def workers_per_engine(url: str) -> dict[str, int]:
    async def _read() -> dict[str, int]:
        import asyncpg

        conn = await asyncpg.connect(pg_dsn(url))
        try:
            rows = await conn.fetch(
                "SELECT engine_id, count(*) AS n FROM workers WHERE status = 'RUNNING' GROUP BY engine_id"
            )
        finally:
            await conn.close()
        return {str(r["engine_id"]): int(r["n"]) for r in rows}

    return asyncio.run(_read())


def bench_throughput(root: Path, jobs: int, engine_count: int, api_count: int, concurrency: int) -> None:
    with server_factory(root / "throughput") as servers:
        servers.root.mkdir(parents=True, exist_ok=True)
        (servers.root / "agents.toml").write_text(PROFILE)
        env = {
            "ORCHESTRATOR_AGENTS_FILE": str(servers.root / "agents.toml"),
            "ORCHESTRATOR_QUOTAS": f"{concurrency},8,5,3,2,1",
        }
        apis = [servers.start(ORCHESTRATOR_ENGINE="false", **env) for _ in range(api_count)]
        url = servers.database_url()
        started = time.perf_counter()
        asyncio.run(submit_spread([a.url for a in apis], jobs, {"task_description": "t", "agent": "true"}))
        print(
            f"queued {jobs} jobs through {api_count} API processes in {time.perf_counter() - started:.1f} s"
        )
        with QuotaSampler(url) as sampler, engines(servers, apis[0], engine_count, **env) as procs:
            began = time.perf_counter()
            wait_for(
                lambda: count_status(url, "COMPLETED") + count_status(url, "FAILED") >= jobs,
                "all jobs finished",
                timeout=7200,
            )
            wall = time.perf_counter() - began
            cpu = {p.pid: cpu_seconds(p.pid) for p in procs}
            alive = all(p.poll() is None for p in procs)
            pids = dict(sampler.engine_pids)
        result = audit(url)
        problems = result.exactly_once() + sampler.exceeded() + ([] if alive else ["an engine died"])
        direct, _ = direct_baseline(jobs, concurrency)
        sandboxed = sandboxed_baseline(root / "sandboxed", jobs, concurrency)
    print(
        f"{jobs} one-worker `true` jobs, {engine_count} engines + {api_count} API processes, depth-0 quota "
        f"{concurrency}: {result.span_s:.1f} s first start to last end ({wall:.1f} s from the engines' "
        f"start), {jobs / result.span_s:.0f} jobs/s; direct spawning {direct:.1f} s "
        f"(ratio {result.span_s / direct:.1f}x)"
        + (
            f", direct sandboxed {sandboxed:.1f} s (ratio {result.span_s / sandboxed:.1f}x)"
            if sandboxed
            else ""
        )
    )
    for engine_id, count in sorted(result.jobs_per_engine.items()):
        pid = pids.get(engine_id)
        used = f", CPU {cpu[pid]:.1f} s" if pid in cpu else ""
        print(f"  engine {engine_id}: {count} jobs ({100 * count / jobs:.1f} %){used}")
    print(
        f"  quota samples: {sampler.samples}; peak per depth holding a slot {dict(sampler.peak_holding)}, "
        f"RUNNING {dict(sampler.peak_running)}, quotas {sampler.quotas}"
    )
    print(f"  exactly once and within quota: {'yes' if not problems else 'NO: ' + '; '.join(problems)}")


def bench_sleepers(root: Path, count: int, engine_count: int, api_count: int, window: float) -> None:
    with server_factory(root / "sleepers") as servers:
        servers.root.mkdir(parents=True, exist_ok=True)
        (servers.root / "agents.toml").write_text(PROFILE)
        env = {
            "ORCHESTRATOR_AGENTS_FILE": str(servers.root / "agents.toml"),
            "ORCHESTRATOR_QUOTAS": f"{count},8,5,3,2,1",
        }
        apis = [servers.start(ORCHESTRATOR_ENGINE="false", **env) for _ in range(api_count)]
        url = servers.database_url()
        with engines(servers, apis[0], engine_count, **env) as procs:
            started = time.perf_counter()
            asyncio.run(
                submit_spread([a.url for a in apis], count, {"task_description": "t", "agent": "sleep"})
            )
            wait_for(lambda: workers_in(url, "RUNNING") >= count, f"{count} sleepers running", timeout=3600)
            ramp = time.perf_counter() - started
            time.sleep(5)  # let start-up work (log cursors, first reads) settle
            before = {p.pid: cpu_seconds(p.pid) for p in procs}
            t0 = time.perf_counter()
            time.sleep(window)
            elapsed = time.perf_counter() - t0
            percent = {pid: (cpu_seconds(pid) - before[pid]) / elapsed * 100 for pid in before}
            running = workers_in(url, "RUNNING")
            shares = workers_per_engine(url)
            alive = all(p.poll() is None for p in procs)
            headers = {"Authorization": f"Bearer {token()}"}
            import httpx

            with httpx.Client(base_url=apis[0].url, headers=headers, timeout=120) as client:
                ids, offset = [], 0
                while page := client.get("/api/jobs", params={"limit": 1000, "offset": offset}).json()[
                    "jobs"
                ]:
                    ids += [j["id"] for j in page]
                    offset += len(page)
                for job_id in ids:
                    client.post(f"/api/jobs/{job_id}/cancel")
            wait_for(lambda: workers_in(url, "RUNNING") == 0, "sleepers stopped", timeout=1800)
    print(
        f"{count} sleeping workers over {engine_count} engines: all RUNNING after {ramp:.1f} s; "
        f"{running} still RUNNING at the end of the {elapsed:.0f} s window; engines alive: {alive}"
    )
    print(f"  workers per engine: {sorted(shares.values(), reverse=True)}")
    print(
        "  engine CPU over the window (% of one core): "
        + ", ".join(f"{v:.1f}" for v in sorted(percent.values(), reverse=True))
        + f" (target < 10 each): {'yes' if max(percent.values()) < 10 else 'NO'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["throughput", "sleepers"], default=None)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--apis", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=10, help="depth-0 quota (default: the shipped 10)")
    parser.add_argument("--sleepers", type=int, default=2000)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of CPU measurement")
    args = parser.parse_args()
    print(f"PostgreSQL, cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "throughput"):
            bench_throughput(Path(tmp), args.jobs, args.engines, args.apis, args.concurrency)
        if args.only in (None, "sleepers"):
            bench_sleepers(Path(tmp), args.sleepers, args.engines, args.apis, args.window)


if __name__ == "__main__":
    main()
