"""Live-stream benchmarks (targets live here, never in tests).

    .venv/bin/python bench/streams.py [--idle 20,200] [--trees 3] [--compare DIR]

1. N idle streams (`GET /api/jobs/{id}/events?follow=true` on PENDING jobs, no engine): the API
   process's CPU, in percent of one core, over 10 s (`--compare DIR`: also with another version's
   `orchestrator` package from DIR, e.g. `git archive <commit> orchestrator | tar -x -C DIR`,
   right after, so both share the machine's load of the moment);
2. delivery delay of changes made in another process: an API without engine serves the stream of a
   small job tree that `orchestrator engine` (another process) runs; for every status message,
   the time it arrived minus the server timestamp of the change, p50 and max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine import cpu_seconds, server_token  # noqa: E402
from orchestrator.core.config import Settings  # noqa: E402
from tests.streams.sse import follow  # noqa: E402
from tests.streams.test_streams import TREE  # noqa: E402
from tests.support.servers import server_factory  # noqa: E402

MEASURE_SECONDS = 10.0
# The shipped safety-net poll, not the test suite's (which pushes it out of reach).
SHIPPED = {
    "ORCHESTRATOR_SSE_IDLE_POLL_SECONDS": str(
        Settings.model_fields["orchestrator_sse_idle_poll_seconds"].default
    )
}


def idle_streams_cpu(root: Path, count: int, code: Path | None = None) -> float:
    """Percent of one core the API spends while `count` streams wait on jobs that never change."""
    root.mkdir(parents=True)
    with server_factory(root) as servers:
        extra = {"PYTHONPATH": str(code)} if code is not None else {}
        api = servers.make(ORCHESTRATOR_ENGINE="false", **SHIPPED, **extra).start(timeout=120)
        assert api.process is not None
        with api.client() as client:
            jobs = [
                client.post("/api/jobs/submit", json={"task_description": f"idle {i}"}).json()["id"]
                for i in range(count)
            ]

        async def measure() -> float:
            assert api.process is not None
            limits = httpx.Limits(max_connections=count + 10)
            headers = {"Authorization": f"Bearer {server_token()}"}
            async with httpx.AsyncClient(
                base_url=api.url, headers=headers, timeout=60, limits=limits
            ) as client:
                streaming: set[str] = set()
                all_streaming = asyncio.Event()

                async def hold(job_id: str) -> None:
                    async with client.stream(
                        "GET", f"/api/jobs/{job_id}/events", params={"follow": "true"}
                    ) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data:"):  # its first poll is done (the job's first event)
                                streaming.add(job_id)
                                if len(streaming) == count:
                                    all_streaming.set()

                tasks = [asyncio.create_task(hold(job_id)) for job_id in jobs]
                # Every stream open and past its first poll: with many streams on a loaded host
                # that takes longer than any fixed wait, and measuring it would measure start-up.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_streaming.wait(), 300)
                assert len(streaming) == count, f"only {len(streaming)} of {count} streams started"
                await asyncio.sleep(2)
                cpu_before, started = cpu_seconds(api.process.pid), time.perf_counter()
                await asyncio.sleep(MEASURE_SECONDS)
                percent = 100 * (cpu_seconds(api.process.pid) - cpu_before) / (time.perf_counter() - started)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return percent

        return asyncio.run(measure())


def cross_process_delays(root: Path, trees: int) -> list[float]:
    """Seconds from each status change (made by an engine in another process) to its delivery."""
    root.mkdir(parents=True)
    delays: list[float] = []
    with server_factory(root) as servers:
        api = servers.start(ORCHESTRATOR_ENGINE="false", **SHIPPED)
        with servers.standalone_engine(api, **SHIPPED), api.client() as client:
            for _ in range(trees):
                job_id = client.post("/api/jobs/submit", json=TREE).json()["id"]
                stream = follow(client, f"/api/jobs/{job_id}/events?follow=true", max_seconds=120)
                assert stream.ended, "the stream did not end"
                delays += [
                    m.received - datetime.fromisoformat(m.json()["created_at"]).timestamp()
                    for m in stream.messages
                    if m.event in ("job.status", "worker.status")
                ]
    return delays


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", default="20,200", help="numbers of idle streams, comma-separated")
    parser.add_argument("--trees", type=int, default=3)
    parser.add_argument("--compare", type=Path, help="another version's orchestrator package's parent")
    args = parser.parse_args()
    with open("/proc/loadavg") as handle:
        print(f"load average at start: {handle.read().split()[:3]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for index, count in enumerate(int(n) for n in args.idle.split(",") if n):
            for label, code in (
                [("this", None), ("compared", args.compare)] if args.compare else [("this", None)]
            ):
                percent = idle_streams_cpu(Path(tmp) / f"idle-{index}-{label}", count, code)
                print(f"{label:8} {count} idle streams: API at {percent:.1f}% of one core", flush=True)
        if args.trees:
            delays = sorted(cross_process_delays(Path(tmp) / "delays", args.trees))
            print(
                f"{len(delays)} status changes made by an engine in another process: delivered after "
                f"p50 {statistics.median(delays) * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms"
            )
    with open("/proc/loadavg") as handle:
        print(f"load average at end: {handle.read().split()[:3]}", flush=True)


if __name__ == "__main__":
    main()
