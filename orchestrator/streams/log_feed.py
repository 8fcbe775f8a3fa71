"""One worker's log live: its lines in order, its status changes, and an end once it has ended.

Each line's id is its line number, so `Last-Event-ID: <seq>` resumes with the next line.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence

from orchestrator.core.states import WORKER_FINAL, WorkerStatus
from orchestrator.db.models import Worker, WorkerLog
from orchestrator.db.session import Database
from orchestrator.streams.horizon import ChangeMark
from orchestrator.streams.messages import BATCH, FeedMessage
from orchestrator.streams.wakeups import WakeHub
from orchestrator.workers import repository as workers_repo


def _status_message(worker: Worker) -> FeedMessage:
    data = {
        "worker_id": worker.id,
        "status": worker.status,
        "exit_code": worker.exit_code,
        "status_reason": worker.status_reason,
    }
    return FeedMessage("status", json.dumps(data))


def _line_message(line: WorkerLog) -> FeedMessage:
    data = {"seq": line.seq, "text": line.text, "created_at": line.created_at.isoformat()}
    return FeedMessage("log", json.dumps(data, ensure_ascii=False), str(line.seq))


def _in_order(lines: Sequence[WorkerLog], next_seq: int, ended: bool) -> list[WorkerLog]:
    """The lines from `next_seq` on without a hole. Lines of one worker are stored in order by its
    one engine; a hole is waited for while the worker runs, and skipped once it has ended."""
    taken: list[WorkerLog] = []
    for line in lines:
        if line.seq != next_seq and not ended:
            break
        taken.append(line)
        next_seq = line.seq + 1
    return taken


def _end_message(worker: Worker, next_seq: int) -> FeedMessage:
    data = {"worker_id": worker.id, "status": worker.status, "lines": next_seq}
    return FeedMessage("end", json.dumps(data), str(next_seq - 1) if next_seq else None)


async def follow_worker_log(
    db: Database, hub: WakeHub, worker_id: str, next_seq: int
) -> AsyncGenerator[FeedMessage, None]:
    """Lines `next_seq`, `next_seq + 1`, ... as they are stored, until the worker has ended."""
    last_status: str | None = None
    with hub.subscribe() as wakeup:
        while True:
            wakeup.clear()
            async with db.read_session() as session:
                wakeup.seen = await ChangeMark.read(session, db.is_postgres)
                worker = await workers_repo.get_worker(session, worker_id)
                if worker is None:  # deleted meanwhile (garbage collection)
                    return
                lines = await workers_repo.read_logs(session, worker_id, next_seq, BATCH)
            ended = WorkerStatus(worker.status) in WORKER_FINAL and not worker.holds_slot
            if worker.status != last_status:
                last_status = worker.status
                yield _status_message(worker)
            for line in _in_order(lines, next_seq, ended):
                next_seq = line.seq + 1
                yield _line_message(line)
            if len(lines) == BATCH and next_seq > lines[-1].seq:
                continue
            if ended and next_seq >= worker.log_lines:
                yield _end_message(worker, next_seq)
                return
            await wakeup.wait()
