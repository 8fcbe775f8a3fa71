"""A job's whole tree, fetched cheaply: the job, its descendants, their workers and the last
line of each running worker's log; drawn by `orchestrator.cli.live`.

Listings come newest first and every descendant (and every worker) of a job is created after the
job, so scanning the listing until it is older than the root usually takes one request per poll.
On a very busy server it falls back to walking the tree by `parent_job_id`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator.cli.client import ApiClient
from orchestrator.cli.output import JOB_FINAL, CliError, parse_time

PAGE_SIZE = 1000
MAX_SCAN_PAGES = 5
MAX_LOG_POLLS = 8  # running workers whose log is read per poll, in rotation


@dataclass
class Snapshot:
    root: dict[str, Any]
    jobs: dict[str, dict[str, Any]]
    children: dict[str, list[str]]
    workers: dict[str, list[dict[str, Any]]]
    last_lines: dict[str, str] = field(default_factory=dict)
    taken_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # When it was read on this machine's monotonic clock: the stamps a watcher prints never go back.
    taken_mono: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.root.get("status") in JOB_FINAL

    def walk(self, job_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Jobs of the tree, parents before children."""
        start = job_id or self.root["id"]
        stack = [start]
        while stack:
            current = stack.pop()
            yield self.jobs[current]
            stack.extend(reversed(self.children.get(current, [])))

    def all_workers(self) -> list[dict[str, Any]]:
        return [w for job in self.walk() for w in self.workers.get(job["id"], [])]


def _scan_recent(api: ApiClient, path: str, key: str, since: datetime) -> list[dict[str, Any]] | None:
    """Items created at or after `since`, or None when that would take too many pages."""
    found: list[dict[str, Any]] = []
    for page in range(MAX_SCAN_PAGES):
        data = api.get(path, limit=PAGE_SIZE, offset=page * PAGE_SIZE)
        items: list[dict[str, Any]] = data.get(key, [])
        for item in items:
            created = parse_time(item.get("created_at"))
            if created is not None and created < since:
                return found
            found.append(item)
        if len(items) < PAGE_SIZE:
            return found
    return None


def _walk_jobs(api: ApiClient, root: dict[str, Any]) -> list[dict[str, Any]]:
    found = [root]
    frontier = [root["id"]]
    while frontier:
        parent = frontier.pop()
        for child in api.paged("/api/jobs", "jobs", parent_job_id=parent):
            found.append(child)
            frontier.append(child["id"])
    return found


class TreeFetcher:
    """Polls one job's subtree, its workers and the last log line of its running workers."""

    def __init__(self, api: ApiClient, root_id: str, *, tail_logs: bool = True) -> None:
        self.api = api
        self.root_id = root_id
        self.tail_logs = tail_logs
        self._log_offsets: dict[str, int] = {}
        self._last_lines: dict[str, str] = {}
        self._rotation = 0

    def snapshot(self) -> Snapshot:
        root: dict[str, Any] = self.api.get(f"/api/jobs/{self.root_id}")
        since = parse_time(root.get("created_at")) or datetime.min.replace(tzinfo=UTC)
        listed = _scan_recent(self.api, "/api/jobs", "jobs", since)
        if listed is None:
            listed = _walk_jobs(self.api, root)
        by_id = {job["id"]: job for job in listed}
        by_id[root["id"]] = root
        children: dict[str, list[str]] = {}
        for job in sorted(by_id.values(), key=lambda j: (j.get("created_at") or "", j["id"])):
            parent = job.get("parent_job_id")
            if parent and job["id"] != root["id"]:
                children.setdefault(parent, []).append(job["id"])
        jobs: dict[str, dict[str, Any]] = {}
        stack = [root["id"]]
        while stack:
            current = stack.pop()
            jobs[current] = by_id[current]
            stack.extend(children.get(current, []))
        children = {k: [c for c in v if c in jobs] for k, v in children.items() if k in jobs}

        workers_listed = _scan_recent(self.api, "/api/supervisor/workers", "workers", since)
        if workers_listed is None:
            workers_listed = [
                w
                for job_id in jobs
                for w in self.api.paged("/api/supervisor/workers", "workers", job_id=job_id)
            ]
        workers: dict[str, list[dict[str, Any]]] = {}
        for worker in workers_listed:
            if worker.get("job_id") in jobs:
                workers.setdefault(worker["job_id"], []).append(worker)
        for group in workers.values():
            group.sort(key=lambda w: (w.get("worker_index", 0), w["id"]))

        snap = Snapshot(root=root, jobs=jobs, children=children, workers=workers)
        if self.tail_logs:
            self._tail(snap)
        snap.last_lines = dict(self._last_lines)
        return snap

    def _tail(self, snap: Snapshot) -> None:
        running = [w for w in snap.all_workers() if w.get("status") in ("RUNNING", "PAUSED")]
        if not running:
            return
        start = self._rotation % len(running)
        chosen = (running[start:] + running[:start])[:MAX_LOG_POLLS]
        self._rotation += len(chosen)
        for worker in chosen:
            offset = self._log_offsets.get(worker["id"], 0)
            try:
                data = self.api.get(f"/api/supervisor/workers/{worker['id']}/logs", offset=offset, limit=1000)
            except CliError:
                continue  # a log that cannot be read now must not stop the view
            lines = data.get("lines") or []
            if lines:
                self._last_lines[worker["id"]] = str(lines[-1].get("text", ""))
            self._log_offsets[worker["id"]] = int(data.get("next_offset", offset))
