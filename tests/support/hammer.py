"""Load generators that run in separate OS processes (multiprocessing, spawn): each process fires
many requests at once from its own threads, so the server sees truly concurrent calls."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx


def fire(args: tuple[str, str, list[dict[str, Any]], int]) -> list[tuple[int, dict[str, Any]]]:
    """POST each `(path, body)` of `calls` with `threads` threads; return (status, json) per call."""
    base_url, token, calls, threads = args
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    with httpx.Client(base_url=base_url, headers=headers, timeout=120.0, limits=limits) as client:

        def one(call: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            r = client.post(call["path"], json=call["body"])
            try:
                body = r.json()
            except ValueError:
                body = {"raw": r.text}
            return r.status_code, body

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, calls))


def allocate_calls(
    job_ids: list[str], depth: int, count: int, seed: int, max_request: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "path": "/api/resources/allocate",
            "body": {
                "job_id": rng.choice(job_ids),
                "depth": depth,
                "worker_count": rng.randint(1, max_request),
            },
        }
        for _ in range(count)
    ]
