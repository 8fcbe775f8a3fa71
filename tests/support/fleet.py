"""Several `orchestrator engine` processes and API processes on one PostgreSQL database, and the
checks that hold whatever their number: every job ran exactly once, no quota was ever exceeded.

Shared by tests/integration/test_many_engines.py (small, asserted) and bench/many_engines.py (large,
measured). The checks read the database directly: what the engines recorded is what is checked.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.servers import Server, ServerFactory


def pg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@contextmanager
def engines(
    factory: ServerFactory, api: Server, count: int, **extra: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` engine processes started together (so none has a head start beyond its own
    start-up), each with its own log; stopped with SIGTERM at the end (killed if one hangs)."""
    env = factory.base_env(ORCHESTRATOR_PUBLIC_URL=api.url, **extra)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for _ in range(count):
            log_path = factory.root / f"engine-{uuid.uuid4().hex[:8]}.log"
            with log_path.open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [str(Path(sys.executable).parent / "orchestrator"), "engine"],
                        cwd=factory.root,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            logs.append(log_path)
        deadline = time.monotonic() + 300  # generous: several interpreters importing on 2 busy cores
        for proc, log_path in zip(procs, logs, strict=True):
            while "Engine running" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"an engine did not start:\n{log_path.read_text(errors='replace')}")
                time.sleep(0.05)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class QuotaSampler:
    """Samples, in one snapshot each time, the workers holding a slot and the RUNNING workers per
    depth, next to each depth's quota, until stopped: the highest counts seen must stay within it."""

    url: str
    samples: int = 0
    peak_holding: Counter[int] = field(default_factory=Counter)
    peak_running: Counter[int] = field(default_factory=Counter)
    quotas: dict[int, int] = field(default_factory=dict)
    engine_pids: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def __enter__(self) -> QuotaSampler:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    async def _run(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(pg_dsn(self.url))
        try:
            while not self._stop.is_set():
                try:
                    await self._sample(conn)
                except Exception as exc:  # reported by exceeded(), not lost in a thread
                    self.error = exc
                    return
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    async def _sample(self, conn: Any) -> None:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                "SELECT depth, count(*) FILTER (WHERE holds_slot) AS holding,"
                " count(*) FILTER (WHERE status = 'RUNNING') AS running FROM workers GROUP BY depth"
            )
            pools = await conn.fetch("SELECT depth, max_workers FROM resource_pools")
            for engine in await conn.fetch("SELECT id, pid FROM engines"):
                self.engine_pids[engine["id"]] = engine["pid"]
        self.quotas = {p["depth"]: p["max_workers"] for p in pools}
        for row in rows:
            depth = row["depth"]
            self.peak_holding[depth] = max(self.peak_holding[depth], row["holding"])
            self.peak_running[depth] = max(self.peak_running[depth], row["running"])
        self.samples += 1

    def exceeded(self) -> list[str]:
        """Every depth where a sample saw more workers than the quota (empty: never exceeded)."""
        if self.error is not None:
            raise RuntimeError(f"the quota sampler failed: {self.error!r}")
        found = []
        for depth, quota in self.quotas.items():
            for name, peaks in (("holding a slot", self.peak_holding), ("RUNNING", self.peak_running)):
                if peaks[depth] > quota:
                    found.append(f"depth {depth}: {peaks[depth]} workers {name}, quota {quota}")
        return found


@dataclass
class Audit:
    jobs: int
    by_status: dict[str, int]
    workers_per_job: Counter[int]  # how many jobs have N workers
    starts_per_worker: Counter[int]  # how many workers went IDLE -> RUNNING N times
    failed_workers: int
    jobs_per_engine: dict[str, int]
    span_s: float  # first worker start to last job end (server timestamps)

    def exactly_once(self) -> list[str]:
        """What contradicts "every job ran exactly once, with one worker": empty if nothing."""
        problems = []
        if self.by_status != {"COMPLETED": self.jobs}:
            problems.append(f"job statuses {self.by_status}")
        if self.workers_per_job != Counter({1: self.jobs}):
            problems.append(f"jobs by worker count {dict(self.workers_per_job)}")
        if self.starts_per_worker != Counter({1: self.jobs}):
            problems.append(f"workers by number of starts {dict(self.starts_per_worker)}")
        if self.failed_workers:
            problems.append(f"{self.failed_workers} worker(s) not COMPLETED with exit code 0")
        return problems


def audit(url: str) -> Audit:
    async def _read() -> Audit:
        import asyncpg

        conn = await asyncpg.connect(pg_dsn(url))
        try:
            statuses = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
            per_job = await conn.fetch(
                "SELECT n, count(*) AS jobs FROM (SELECT j.id, count(w.id) AS n FROM jobs j"
                " LEFT JOIN workers w ON w.job_id = j.id GROUP BY j.id) t GROUP BY n"
            )
            starts = await conn.fetch(
                "SELECT n, count(*) AS workers FROM (SELECT w.id, count(e.id) AS n FROM workers w"
                " LEFT JOIN events e ON e.worker_id = w.id AND e.kind = 'worker.status'"
                " AND e.from_status = 'IDLE' AND e.to_status = 'RUNNING' GROUP BY w.id) t GROUP BY n"
            )
            failed = await conn.fetchval(
                "SELECT count(*) FROM workers WHERE status <> 'COMPLETED' OR exit_code IS DISTINCT FROM 0"
            )
            shares = await conn.fetch("SELECT engine_id, count(*) AS n FROM jobs GROUP BY engine_id")
            span = await conn.fetchval(
                "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs"
            )
        finally:
            await conn.close()
        return Audit(
            jobs=sum(r["n"] for r in statuses),
            by_status={r["status"]: r["n"] for r in statuses},
            workers_per_job=Counter({r["n"]: r["jobs"] for r in per_job}),
            starts_per_worker=Counter({r["n"]: r["workers"] for r in starts}),
            failed_workers=failed,
            jobs_per_engine={str(r["engine_id"]): r["n"] for r in shares},
            span_s=float(span or 0.0),
        )

    return asyncio.run(_read())


def count_status(url: str, status: str) -> int:
    async def _count() -> int:
        import asyncpg

        conn = await asyncpg.connect(pg_dsn(url))
        try:
            return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE status = $1", status))
        finally:
            await conn.close()

    return asyncio.run(_count())
