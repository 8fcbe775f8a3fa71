"""Delegation benchmark: how long a chain of delegating workers takes, launch to done.

    .venv/bin/python bench/tree.py [--depth 5] [--runs 5]

A root job whose simulated worker (working 0 s) delegates one child, which delegates one child,
... down to `--depth`: every level starts a worker process, submits its child through the API
with its delegated token, and waits for it. The time is the root's `finished_at - created_at`
(server timestamps), so it counts every start, every wait and every settling on the way back up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.servers import TEST_SECRET_KEY, server_factory  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY  # tokens made here must verify in the server

FINAL = ("COMPLETED", "FAILED", "CANCELED")


def chain(depth: int) -> dict[str, Any]:
    options: dict[str, Any] = {"duration_seconds": 0}
    for _ in range(depth):
        options = {
            "duration_seconds": 0,
            "subtasks": [{"task_description": "level", "agent_options": options}],
        }
    return options


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    spans: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, server_factory(Path(tmp)) as servers:
        api = servers.start()
        with api.client() as client:
            for _ in range(args.runs):
                body = {"task_description": "root", "agent": "simulated", "agent_options": chain(args.depth)}
                response = client.post("/api/jobs/submit", json=body)
                response.raise_for_status()
                job = response.json()
                while (job := client.get(f"/api/jobs/{job['id']}").json())["status"] not in FINAL:
                    time.sleep(0.02)
                if job["status"] != "COMPLETED":
                    raise RuntimeError(f"the chain ended {job['status']}: {job.get('status_reason')}")
                spans.append((parse(job["finished_at"]) - parse(job["created_at"])).total_seconds())
    print(
        f"chain of {args.depth + 1} delegating simulated workers (depth 0-{args.depth}), submit to "
        f"COMPLETED: {', '.join(f'{s:.2f}' for s in spans)} s; median {statistics.median(spans):.2f} s"
    )


if __name__ == "__main__":
    main()
