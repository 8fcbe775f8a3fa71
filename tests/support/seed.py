"""A fleet's history written straight into a test server's database: thousands of finished job
trees (the engine never touches a final job), with known statuses, agents, repositories, times,
task texts and FAILED reasons, so a test can compute the answer to any filter from the rows."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.core.ids import new_job_id
from orchestrator.db.models import Job, utcnow
from tests.support.db import run_in_db
from tests.support.servers import Server

FINAL = ("COMPLETED", "FAILED", "CANCELED")
AGENTS = ("simulated", "claude_code", "codex")
REPOSITORIES = (None, "/srv/repos/billing", "/srv/repos/search")
WORDS = ("refactor", "billing", "search", "index", "tests", "docs", "cache", "parser", "api", "auth")
# Texts with LIKE's wildcards in them, to check that a search takes them literally.
ODD_TEXTS = ("grow coverage to 100% on parser", "rename snake_case helpers", "plain words only")


@dataclass(frozen=True)
class SeededJob:
    id: str
    parent_job_id: str | None
    depth: int
    path: str
    status: str
    agent: str
    repository: str | None
    task_description: str
    status_reason: str | None
    created_at: datetime


def seed_fleet(server: Server, roots: int, *, seed: int = 17, children_every: int = 10) -> list[SeededJob]:
    """`roots` finished trees, created one a minute back from an hour ago (newest first in the
    list); every `children_every`-th root has two children, one of which has a child."""
    rng = random.Random(seed)
    start = utcnow() - timedelta(hours=1)
    jobs: list[SeededJob] = []

    def make(parent: SeededJob | None, created_at: datetime, index: int) -> SeededJob:
        job_id = new_job_id()
        status = FINAL[rng.randrange(3)]
        text = (
            ODD_TEXTS[index % len(ODD_TEXTS)]
            if index % 97 == 0
            else " ".join(rng.choice(WORDS) for _ in range(4)).capitalize()
        )
        job = SeededJob(
            id=job_id,
            parent_job_id=parent.id if parent else None,
            depth=parent.depth + 1 if parent else 0,
            path=(parent.path if parent else "") + job_id + "/",
            status=status,
            agent=parent.agent if parent else AGENTS[rng.randrange(len(AGENTS))],
            repository=parent.repository if parent else REPOSITORIES[rng.randrange(len(REPOSITORIES))],
            task_description=f"{text} #{index}",
            status_reason=f"worker 0 exited with code {1 + index % 5}" if status == "FAILED" else None,
            created_at=created_at,
        )
        jobs.append(job)
        return job

    for i in range(roots):
        created = start - timedelta(minutes=i)
        root = make(None, created, i)
        if i % children_every == 0:
            child = make(root, created + timedelta(seconds=1), i)
            make(root, created + timedelta(seconds=2), i)
            make(child, created + timedelta(seconds=3), i)

    async def _insert(session: AsyncSession) -> None:
        rows = [
            {
                "id": j.id,
                "status": j.status,
                "task_description": j.task_description,
                "worker_count": 1,
                "depth": j.depth,
                "parent_job_id": j.parent_job_id,
                "path": j.path,
                "priority": 0,
                "agent": j.agent,
                "agent_options": {},
                "repository": j.repository,
                "created_by": "seed",
                "status_reason": j.status_reason,
                "created_at": j.created_at,
                "updated_at": j.created_at,
                "started_at": j.created_at,
                "finished_at": j.created_at + timedelta(seconds=30),
            }
            for j in jobs
        ]
        # Parents before children (the foreign key), in batches the drivers take in one go.
        rows.sort(key=lambda row: row["depth"])
        for begin in range(0, len(rows), 2000):
            await session.execute(insert(Job), rows[begin : begin + 2000])

    run_in_db(server, _insert)
    return jobs


def newest_first(jobs: list[SeededJob]) -> list[SeededJob]:
    """The list's order: newest first, then id descending."""
    return sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)
