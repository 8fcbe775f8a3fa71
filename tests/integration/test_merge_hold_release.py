"""After `merge_subjob` held a worker (every process stopped), it continues only a worker still
RUNNING in the database: one the user paused meanwhile stays stopped (the engine counts a pause
applied when its SIGSTOP finds the processes stopped already), one that ended is the engine's to
signal. Real database rows; the hold records what it is asked to do."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.workspaces import results
from tests.integration.test_engine_lifecycle import submit
from tests.support.db import run_in_db, seed_worker
from tests.support.servers import ServerFactory


class Recorded:
    def __init__(self) -> None:
        self.resumed: list[str] = []

    def stop(self, worker_id: str) -> str:
        return "held"

    def resume(self, worker_id: str) -> None:
        self.resumed.append(worker_id)


def test_a_held_worker_is_continued_only_if_it_still_runs(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false")
    with server.client() as client:
        job = submit(client)
    ids = {status: seed_worker(server, job["id"], status) for status in ("RUNNING", "PAUSED", "FAILED")}
    hold = Recorded()
    for worker_id in ids.values():

        async def release(session: AsyncSession, worker_id: str = worker_id) -> None:
            await results._release(session, hold, worker_id)

        run_in_db(server, release)
    assert hold.resumed == [ids["RUNNING"]]
