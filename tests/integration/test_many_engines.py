"""Two engine processes and two API processes on one PostgreSQL database: every job runs exactly
once, and no depth ever has more workers than its quota (bench/many_engines.py is the large version).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.fleet import QuotaSampler, audit, count_status, engines, pg_dsn
from tests.support.servers import ServerFactory, token
from tests.support.servers import test_database_kind as database_kind
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(database_kind() != "postgres", reason="engines sharing a PostgreSQL database")

JOBS = 300
QUOTA = 5  # small, so the engines compete for slots all the time
QUOTAS = f"{QUOTA},8,5,3,2,1"
# Each run prints the wall-clock time (ns) it began and ended, taken inside the sandbox: the
# processes' own lifetimes, not the engines' bookkeeping, are checked against the quota.
PROFILE = """
[agents.stamp]
type = "command"
command = ["sh", "-c", "echo start $(date +%s%N); sleep 0.05; echo end $(date +%s%N)"]
"""


async def submit_all(urls: list[str], count: int) -> list[str]:
    """`count` submits spread over the API processes, a few at a time each."""
    headers = {"Authorization": f"Bearer {token()}"}
    clients = [httpx.AsyncClient(base_url=url, headers=headers, timeout=60) for url in urls]
    semaphore = asyncio.Semaphore(8)

    async def one(index: int) -> str:
        async with semaphore:
            body = {"task_description": f"job {index}", "agent": "stamp"}
            response = await clients[index % len(clients)].post("/api/jobs/submit", json=body)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

    try:
        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients:
            await client.aclose()


def process_lifetimes(url: str) -> dict[str, list[tuple[str, int]]]:
    async def _read() -> dict[str, list[tuple[str, int]]]:
        import asyncpg

        conn = await asyncpg.connect(pg_dsn(url))
        try:
            rows = await conn.fetch(
                "SELECT worker_id, text FROM worker_logs WHERE text LIKE 'start %' OR text LIKE 'end %'"
            )
        finally:
            await conn.close()
        stamps: dict[str, list[tuple[str, int]]] = {}
        for row in rows:
            kind, value = row["text"].split()
            stamps.setdefault(row["worker_id"], []).append((kind, int(value)))
        return stamps

    return asyncio.run(_read())


def most_at_once(intervals: list[tuple[int, int]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in edges:  # at equal times an end (-1) sorts first: touching runs do not overlap
        current += step
        peak = max(peak, current)
    return peak


def test_two_engines_two_apis_each_job_once_within_quota(servers: ServerFactory) -> None:
    profile = servers.root / "agents.toml"
    profile.write_text(PROFILE)
    env = {"ORCHESTRATOR_AGENTS_FILE": str(profile), "ORCHESTRATOR_QUOTAS": QUOTAS}
    apis = [servers.start(ORCHESTRATOR_ENGINE="false", **env) for _ in range(2)]
    url = servers.database_url()
    with engines(servers, apis[0], 2, **env) as procs, QuotaSampler(url) as sampler:
        asyncio.run(submit_all([api.url for api in apis], JOBS))
        wait_until(
            lambda: count_status(url, "COMPLETED") + count_status(url, "FAILED") == JOBS,
            timeout=600,
            what=f"{JOBS} jobs to finish",
        )
        assert all(proc.poll() is None for proc in procs), "an engine died"
    assert sampler.samples > 0
    assert sampler.exceeded() == []

    result = audit(url)
    print(f"jobs per engine: {result.jobs_per_engine}; peaks {dict(sampler.peak_holding)}")
    assert result.exactly_once() == [], result
    assert len(result.jobs_per_engine) == 2, f"both engines must have run jobs: {result.jobs_per_engine}"

    stamps = process_lifetimes(url)
    assert len(stamps) == JOBS
    lifetimes = []
    for worker_id, marks in stamps.items():
        kinds = sorted(kind for kind, _ in marks)
        assert kinds == ["end", "start"], f"worker {worker_id} ran {kinds.count('start')} time(s)"
        values = dict(marks)
        lifetimes.append((values["start"], values["end"]))
    assert most_at_once(lifetimes) <= QUOTA
