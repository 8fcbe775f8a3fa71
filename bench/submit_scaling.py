"""Submit throughput over 1, 2, 4 API processes, with the CPU each submit cost (issue 19).

    .venv/bin/python bench/submit_scaling.py [--databases sqlite,postgres] [--processes 1,2,4]
                                             [--seconds 6] [--rounds 1] [--compare DIR]

For each configuration a real `uvicorn orchestrator.api.main:app --workers N` (engine off) takes
`POST /api/jobs/submit` from wrk (2 threads, 32 connections, user token; bench/api.py's script)
after a 2-second warm-up, and this reports, besides req/s and p99:

* the CPU seconds the server's processes used per stored submit (from /proc: user + system),
  and PostgreSQL's (every `postgres` process on the host: other databases' work too);
* the submits per transaction on PostgreSQL (`pg_stat_database.xact_commit` of the database);
* each server process's share of a core during the run, the share of the machine left idle
  (`/proc/stat`), and how wrk's connections were spread over the processes halfway through
  (`ss`: uvicorn's processes share one listening socket, and a connection stays with the process
  that accepted it);
* the CPU wrk itself used per request (with the one `ss` the spread's sample runs meanwhile: a
  few milliseconds), and the *ceiling*: the submits per second the machine's
  cores could do at this run's CPU per submit (server, PostgreSQL and wrk), if nothing idled and
  nothing else ran. N processes over one cannot beat N processes' ceiling over one's rate: on 2
  cores shared with wrk and PostgreSQL, two processes reach 1.5x one only while a submit costs
  them no more CPU than it costs one;
* at the end, each round's submits per second of N processes over one's, and their median.

With `--rounds` above 1 the configurations alternate round after round, so each ratio compares
runs a minute apart: on this 2-core machine the figure moves by a third within minutes.

CPU per submit is what more processes cost on a 2-core machine, and it is far less disturbed
by other processes' load than req/s: compare it side by side (`--compare DIR`, DIR holding
another version's `orchestrator` package, measured right after this checkout's).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import SUBMIT_LUA, stored_jobs, wrk  # noqa: E402
from tests.support.servers import TEST_SECRET_KEY, server_factory, token  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY
TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def _proc_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(parent: int) -> list[int]:
    found = []
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if int(handle.read().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(pid)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return found


def postgres_cpu() -> dict[int, float]:
    found = {}
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/comm") as handle:
                if handle.read().strip() == "postgres":
                    found[pid] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def commits(database_url: str) -> int:
    name = database_url.rsplit("/", 1)[-1]
    query = f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{name}'"
    out = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", query], capture_output=True, text=True
    ).stdout
    return int(out.strip() or 0)


def idle_and_total() -> tuple[int, int]:
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


def connection_spread(port: str) -> list[int]:
    """Established connections to `port` per server process, largest first."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
    ).stdout
    per_process: collections.Counter[str] = collections.Counter()
    for line in out.splitlines():
        for owner in line.split("pid=")[1:]:
            per_process[owner.split(",")[0]] += 1
    return sorted(per_process.values(), reverse=True)


def measure(database: str, processes: int, seconds: float, code: Path | None) -> tuple[str, float]:
    """The configuration's line, and its submits per second."""
    os.environ["TEST_DATABASE"] = database
    extra = {"ORCHESTRATOR_ENGINE": "false"}
    if code is not None:
        extra["PYTHONPATH"] = str(code)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp, server_factory(Path(tmp)) as servers:
        api = servers.make(workers=processes, **extra).start(timeout=120)
        script = Path(tmp) / "submit.lua"
        script.write_text(SUBMIT_LUA % token())
        wrk(f"{api.url}/api/jobs/submit", 2, 32, script=script)  # warm-up: pools, caches
        assert api.process is not None
        server = [api.process.pid, *children(api.process.pid)]
        postgres = database == "postgres"
        before_cpu = {pid: cpu_seconds(pid) for pid in server}
        before_pg, before_commits = postgres_cpu(), commits(servers.database_url()) if postgres else 0
        before = stored_jobs(api)
        spread: list[int] = []
        port = api.url.rsplit(":", 1)[1]

        def sample_spread() -> None:
            time.sleep(seconds / 2)
            spread.extend(connection_spread(port))

        sampler = threading.Thread(target=sample_spread)
        idle_before, total_before = idle_and_total()
        started = time.monotonic()
        sampler.start()
        before_wrk = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = wrk(f"{api.url}/api/jobs/submit", seconds, 32, script=script)
        elapsed = time.monotonic() - started
        sampler.join()
        after_wrk = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_used = sum(getattr(after_wrk, f) - getattr(before_wrk, f) for f in ("ru_utime", "ru_stime"))
        idle_after, total_after = idle_and_total()
        used = {pid: cpu_seconds(pid) - before_cpu[pid] for pid in server}
        after_pg = postgres_cpu()
        pg_used = sum(after_pg[pid] - before_pg.get(pid, 0.0) for pid in after_pg)
        done_commits = commits(servers.database_url()) - before_commits if postgres else 0
        stored = max(stored_jobs(api) - before, 1)
    busy = [f"{used[pid] / elapsed:.0%}" for pid in server if used[pid] / elapsed >= 0.01]
    server_ms = sum(used.values()) / stored * 1000
    line = f"{result.row()}  server {server_ms:.2f} ms/submit"
    whole_ms = server_ms + wrk_used / max(result.requests, 1) * 1000
    if postgres:
        per_commit = stored / max(done_commits, 1)
        line += f", postgres {pg_used / stored * 1000:.2f} ms/submit, {per_commit:.1f} submits/commit"
        whole_ms += pg_used / stored * 1000
    # What the machine's cores could do at this run's CPU per submit (server, PostgreSQL, wrk), if
    # nothing else ran and nothing idled: the most any number of processes can reach here.
    line += f", wrk {wrk_used / max(result.requests, 1) * 1000:.2f} ms/request"
    line += f"; ceiling {CORES / whole_ms * 1000:,.0f}/s"
    idle = (idle_after - idle_before) / max(total_after - total_before, 1)
    line += f"  (cores: {' '.join(busy)}; idle {idle:.0%}; connections {spread})"
    return line, result.rps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--compare", type=Path, help="another version's orchestrator package's parent")
    args = parser.parse_args()
    with open("/proc/loadavg") as handle:
        print(f"load average at start: {handle.read().split()[:3]}", flush=True)
    rates: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
    for round_ in range(1, args.rounds + 1):
        for database in args.databases.split(","):
            for processes in (int(p) for p in args.processes.split(",")):
                for code in [None, args.compare] if args.compare else [None]:
                    version = "compared" if code else "this"
                    label = f"round {round_} {version:8} {database:8} {processes}p"
                    line, rate = measure(database, processes, args.seconds, code)
                    rates[version, database, processes].append(rate)
                    print(f"{label}  {line}", flush=True)
    for (version, database, processes), per_round in rates.items():
        one = rates.get((version, database, 1))
        if processes == 1 or not one:
            continue
        ratios = [many / single for many, single in zip(per_round, one, strict=True)]
        shown = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        median = statistics.median(ratios)
        print(f"{version} {database} {processes}p / 1p by round: {shown}; median {median:.2f}x")
    with open("/proc/loadavg") as handle:
        print(f"load average at end: {handle.read().split()[:3]}", flush=True)


if __name__ == "__main__":
    main()
