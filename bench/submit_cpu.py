"""CPU per submit of the group commit's write path, in-process, by batch size (issue 19).

    .venv/bin/python bench/submit_cpu.py [--database postgres] [--sizes 1,4,16] [--submits 320]
                                         [--compare DIR]

Drives a `SubmitQueue` directly (no HTTP): `size` root submits at once, again and again, and
reads this process's CPU time (`time.process_time`) and, on PostgreSQL, that of the backends
serving its database, which other processes' load disturbs far less than throughput. A batch's
size is what the number of API processes changes: with 32 connections, one process writes
batches of ~15, four of ~4. `--compare DIR` runs the same in a
subprocess with DIR (another version's `orchestrator` package) first on the import path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def backends_cpu(database_name: str) -> float:
    """CPU seconds of the PostgreSQL backends serving `database_name` (their process titles
    name it): the server's side of the submits, apart from other databases' work."""
    total = 0.0
    for pid in (name for name in os.listdir("/proc") if name.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().decode(errors="replace")
            if title.startswith("postgres:") and f" {database_name} " in title:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / TICKS
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


async def measure(url: str, sizes: list[int], submits: int) -> None:
    from orchestrator.core.auth import Actor
    from orchestrator.core.config import Settings
    from orchestrator.db.migrate import upgrade_database
    from orchestrator.db.session import Database
    from orchestrator.jobs import service
    from orchestrator.jobs.group_commit import SubmitQueue
    from orchestrator.jobs.schemas import JobSubmit

    database = Database(Settings(database_url=url))
    try:
        await upgrade_database(database)
        queue = SubmitQueue(database, database.settings, lambda agent, options: ("simulated", options))
        actor = Actor(name="bench", user_id="bench")
        body = JobSubmit(task_description="bench submit")
        await asyncio.gather(*(service.submit_grouped(queue, actor, body) for _ in range(16)))  # warm-up
        for size in sizes:
            batches = max(1, submits // size)
            name = url.rsplit("/", 1)[-1]
            cpu, server, transactions = time.process_time(), backends_cpu(name), queue.transactions
            for _ in range(batches):
                await asyncio.gather(*(service.submit_grouped(queue, actor, body) for _ in range(size)))
            per_submit = (time.process_time() - cpu) / (batches * size) * 1000
            line = f"  batch {size:2}: {per_submit:.3f} ms CPU a submit"
            if database.is_postgres:
                line += f", PostgreSQL {(backends_cpu(name) - server) / (batches * size) * 1000:.3f} ms"
            per_commit = batches * size / max(queue.transactions - transactions, 1)
            print(f"{line} ({per_commit:.1f} submits a commit)")
    finally:
        await database.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument("--sizes", default="1,4,16")
    parser.add_argument("--submits", type=int, default=320)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--url", help=argparse.SUPPRESS)  # the compared run's database
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.url:
        asyncio.run(measure(args.url, sizes, args.submits))
        return
    sys.path.insert(0, str(ROOT))
    from tests.support.servers import create_pg_database, drop_pg_database

    with tempfile.TemporaryDirectory(prefix="bench-submit-cpu-") as tmp:
        for code in [None, args.compare] if args.compare else [None]:
            url = create_pg_database() if args.database == "postgres" else f"sqlite:///{tmp}/{id(code)}.db"
            try:
                print(f"{'compared' if code else 'this'} ({args.database}):", flush=True)
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (code, ROOT) if p)}
                argv = [sys.executable, __file__, "--url", url, "--sizes", args.sizes]
                subprocess.run([*argv, "--submits", str(args.submits)], env=env, check=True)
            finally:
                if args.database == "postgres":
                    drop_pg_database(url)


if __name__ == "__main__":
    main()
