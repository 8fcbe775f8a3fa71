"""CPU seconds a server's processes spend per submitted job: a count of work that holds on a loaded
machine, where req/s does not (docs/BENCHMARKS.md, "Processes and the engine").

    .venv/bin/python bench/server_cpu.py [--databases sqlite,postgres] [--processes 1,2,4]
                                         [--engine on] [--jobs 1488] [--compare DIR]

For each configuration a real `uvicorn orchestrator.api.main:app --workers N` is started (engine
on: every job runs `sleep 600`, so the depth-0 quota fills and the rest queue, as in bench/api.py),
16 clients submit the jobs, and the user+system CPU time of the server's Python processes (the
master and its children; not the workers) is read from /proc before and after (3 s after the last
submit, for the passes it woke). `--compare DIR`: DIR holds another version's `orchestrator`
package, measured right after this checkout's in each configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine import profiles  # noqa: E402
from tests.support.servers import TEST_SECRET_KEY, server_factory, token  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY
CLIENTS = 16


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of the Python processes in `pid`'s process tree."""
    pending, seen = [pid], []
    while pending:
        current = pending.pop()
        seen.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                pending += [int(p) for p in children.read_text().split()]
            except OSError:
                continue
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for current in seen:
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            if "python" not in Path(f"/proc/{current}/comm").read_text():
                continue
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure(database: str, processes: int, engine: bool, jobs: int, code: Path | None) -> tuple[float, float]:
    os.environ["TEST_DATABASE"] = database
    root = Path(tempfile.mkdtemp(prefix="server-cpu-"))
    extra = {"ORCHESTRATOR_ENGINE": "true" if engine else "false"}
    if engine:
        extra |= {"ORCHESTRATOR_AGENTS_FILE": profiles(root), "ORCHESTRATOR_DEFAULT_AGENT": "sleep"}
    if code is not None:
        extra["PYTHONPATH"] = str(code)
    with server_factory(root) as servers:
        api = servers.make(workers=processes, **extra).start(timeout=300)
        assert api.process is not None
        time.sleep(5)  # every process through its start-up
        headers = {"Authorization": f"Bearer {token()}"}

        def client(_: int) -> None:
            with httpx.Client(base_url=api.url, headers=headers, timeout=60) as http:
                for _ in range(jobs // CLIENTS):
                    response = http.post("/api/jobs/submit", json={"task_description": "cpu"})
                    response.raise_for_status()

        before, started = tree_cpu(api.process.pid), time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        wall = time.monotonic() - started
        time.sleep(3)
        return tree_cpu(api.process.pid) - before, wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--engine", default="on")
    parser.add_argument("--jobs", type=int, default=1488)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    jobs = args.jobs // CLIENTS * CLIENTS
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for database in args.databases.split(","):
        for processes in (int(p) for p in args.processes.split(",")):
            for engine in (e == "on" for e in args.engine.split(",")):
                for label, code in [("this", None)] + ([("compared", args.compare)] if args.compare else []):
                    cpu, wall = measure(database, processes, engine, jobs, code)
                    print(
                        f"{label:8} {database:8} {processes}p engine {'on ' if engine else 'off'}  "
                        f"server CPU {cpu:6.1f} s for {jobs} submits = {1000 * cpu / jobs:5.2f} ms/job  "
                        f"(wall {wall:5.1f} s, load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    print(f"load average at end: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
