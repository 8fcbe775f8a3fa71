"""Engine benchmarks, measured side by side in one run (targets live here, never in tests).

    .venv/bin/python bench/engine.py [--jobs 1000] [--sleepers 1000] [--latency-jobs 200]
                                     [--sandbox on|off|both]

1. submit-to-RUNNING latency (server timestamps: started_at - created_at), p50 and p99;
2. N one-worker jobs running `true` versus starting the same N processes directly with the same
   concurrency (the depth-0 quota), and the ratio; an unsandboxed engine against `true` and a
   sandboxed one against `bwrap … true` (`--sandbox both`, the default: both in one run);
3. N concurrently sleeping workers: the server's CPU use (percent of one core) and memory.

Data dirs go under $TMPDIR: `TMPDIR=/dev/shm` keeps them on tmpfs, which takes the filesystem out
of the comparison (docs/BENCHMARKS.md: on this VM's ext4, directories created within a minute of
a large deletion cost up to ~1 ms each, and every run deletes ~10,000 inodes when it ends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.servers import TEST_SECRET_KEY, Server, server_factory  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY  # tokens made here must verify in the servers

CLK_TCK = os.sysconf("SC_CLK_TCK")


def profiles(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "agents.toml"
    path.write_text('[agents.true]\ncommand = ["true"]\n[agents.sleep]\ncommand = ["sleep", "600"]\n')
    return str(path)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_seconds(pid: int) -> float:
    """CPU of the processes `pid` has reaped (cutime + cstime): for an engine, its workers."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


def postgres_cpu_seconds() -> float | None:
    """CPU used so far by this host's PostgreSQL processes (backends still connected and the
    server's own; None if none runs here). A backend that ends meanwhile takes its share along,
    so this reads low rather than high."""
    total, found = 0.0, False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            total += cpu_seconds(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
        found = True
    return total if found else None


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def submit_many(server: Server, count: int, body: dict[str, object], concurrency: int = 8) -> list[str]:
    headers = {"Authorization": f"Bearer {server_token()}"}
    ids: list[str] = []
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:

        async def one() -> None:
            async with semaphore:
                response = await client.post("/api/jobs/submit", json=body)
                response.raise_for_status()
                ids.append(response.json()["id"])

        await asyncio.gather(*(one() for _ in range(count)))
    return ids


def server_token() -> str:
    from tests.support.servers import token

    return token()


def wait_all_final(client: httpx.Client, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get("/api/jobs", params={"status": "COMPLETED", "limit": 1}).json()
        if body["total"] >= total:
            return
        failed = client.get("/api/jobs", params={"status": "FAILED", "limit": 1}).json()["total"]
        if failed:
            raise RuntimeError(f"{failed} job(s) failed")
        # The run is timed by the server's timestamps, not by this loop: polling more often only
        # takes CPU from the engine (each poll is two listings).
        time.sleep(0.25)
    raise TimeoutError(f"jobs did not complete within {timeout}s")


def bench_latency(root: Path, count: int, sandbox: str) -> dict[str, float]:
    with server_factory(root / f"latency-{sandbox}") as servers:
        # The factory strips ORCHESTRATOR_* from the environment: the mode is passed explicitly.
        server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root), ORCHESTRATOR_SANDBOX=sandbox)
        with server.client() as client:
            latencies = []
            for _ in range(count):
                # One at a time, each on an idle engine: latency, not throughput (that is below).
                body = {"task_description": "t", "agent": "true"}
                job_id = client.post("/api/jobs/submit", json=body).json()["id"]
                while True:
                    job = client.get(f"/api/jobs/{job_id}").json()
                    if job["status"] in ("COMPLETED", "FAILED"):
                        break
                    time.sleep(0.005)
                latencies.append((parse(job["started_at"]) - parse(job["created_at"])).total_seconds() * 1000)
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)],
        "max_ms": latencies[-1],
    }


def direct_baseline(count: int, concurrency: int) -> tuple[float, float]:
    """Wall time, and the CPU it used (this process and the children): on 2 cores the direct
    run keeps both busy, so any engine CPU adds to its time."""
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda _: subprocess.run(["true"], check=True), range(count)))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=True))
    return wall, cpu


def sandboxed_baseline(root: Path, count: int, concurrency: int) -> float | None:
    """The same N `true`s each in the worker sandbox (`bwrap … setpriv … true`, the command the
    engine runs) spawned directly at the same concurrency: the fair baseline for a sandboxed
    engine. None if the sandbox cannot work here."""
    from orchestrator.executors import sandbox

    host = sandbox.detect(root / "sandbox-data")
    if not host.usable:
        return None
    work = root / "sandbox-work"
    work.mkdir(parents=True, exist_ok=True)
    sandbox.give_to_agent(host, work)
    argv = ["/bin/sh", "-c", 'exec "$@" 9<"$0"', str(host.seccomp)]
    argv += sandbox.command(host, sandbox.SandboxSpec(work, work), ["/bin/true"])
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda _: subprocess.run(argv, check=True), range(count)))
    return time.perf_counter() - started


def executor_baseline(root: Path, count: int, concurrency: int) -> float:
    """The same N workers through the local executor alone (run dir, HOME and scratch dir, the
    wrapper that records PID and exit status), no database: what any engine with these durable
    workers pays before its own bookkeeping."""
    from orchestrator.agents.base import LaunchSpec
    from orchestrator.executors.local import LocalExecutor

    executor = LocalExecutor()
    spec = LaunchSpec(argv=["true"], stdin_text="t")

    def one(index: int) -> None:
        run_dir, workdir = root / "runs" / f"w{index}", root / "workspaces" / f"w{index}"
        (run_dir / "home").mkdir(parents=True)
        workdir.mkdir(parents=True)
        proc = executor.start(f"w{index}", spec, workdir, run_dir)
        assert executor.wait(proc, timeout=60) == 0

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - started


def bench_throughput(root: Path, count: int, concurrency: int | None, sandbox: str) -> dict[str, float]:
    """Queue N jobs with no engine running, then let one engine run them all. The engine's time is
    the span from the first worker start to the last job end (server timestamps), so HTTP submits
    and interpreter start-up are not counted on either side."""
    with server_factory(root / f"throughput-{sandbox}") as servers:
        profile = profiles(servers.root)
        quotas = {"ORCHESTRATOR_QUOTAS": f"{concurrency},8,5,3,2,1"} if concurrency else {}
        quotas["ORCHESTRATOR_SANDBOX"] = sandbox
        api = servers.start(ORCHESTRATOR_AGENTS_FILE=profile, ORCHESTRATOR_ENGINE="false", **quotas)
        quota = api.client().get("/api/resources/quotas").json()["quotas"][0]["max_workers"]
        started = time.perf_counter()
        asyncio.run(submit_many(api, count, {"task_description": "t", "agent": "true"}))
        submitted = time.perf_counter() - started
        with servers.standalone_engine(api, ORCHESTRATOR_AGENTS_FILE=profile, **quotas) as engine:
            # Where the run's CPU goes: the engine after its start-up, PostgreSQL, and the API
            # answering this script's polls (two listings every 250 ms).
            assert api.process is not None
            on_postgres = servers.database_url().startswith("postgresql")
            database_cpu_now = postgres_cpu_seconds if on_postgres else lambda: None
            started_cpu = cpu_seconds(engine.pid), database_cpu_now(), cpu_seconds(api.process.pid)
            with api.client() as client:
                wait_all_final(client, count, timeout=900)
                engine_run_cpu = cpu_seconds(engine.pid) - started_cpu[0]
                database_now = database_cpu_now()
                database_cpu = (
                    database_now - started_cpu[1]
                    if database_now is not None and started_cpu[1] is not None
                    else None
                )
                api_cpu = cpu_seconds(api.process.pid) - started_cpu[2]
                first_start, last_end = None, None
                offset = 0
                while True:
                    page = client.get("/api/jobs", params={"limit": 1000, "offset": offset}).json()["jobs"]
                    if not page:
                        break
                    for job in page:
                        start, end = parse(job["started_at"]), parse(job["finished_at"])
                        first_start = start if first_start is None or start < first_start else first_start
                        last_end = end if last_end is None or end > last_end else last_end
                    offset += len(page)
            engine_cpu = cpu_seconds(engine.pid)
            workers_cpu = children_cpu_seconds(engine.pid)
    assert first_start is not None and last_end is not None
    return {
        "concurrency": quota,
        "engine_s": (last_end - first_start).total_seconds(),
        "submit_phase_s": submitted,
        "engine_cpu_s": engine_cpu,
        "engine_run_cpu_s": engine_run_cpu,
        "workers_cpu_s": workers_cpu,
        "database_cpu_s": -1.0 if database_cpu is None else database_cpu,
        "api_cpu_s": api_cpu,
    }


def fair_baseline(root: Path, count: int, concurrency: int, sandbox: str) -> tuple[float, float | None]:
    """The direct run an engine run is compared with, measured right after it (under a moving
    load, only runs minutes apart compare): `true` for an unsandboxed engine, `bwrap … true` for
    a sandboxed one (0.0 if the sandbox cannot work here); its wall time, and its CPU where
    measured (the unsandboxed run)."""
    if sandbox == "off":
        return direct_baseline(count, concurrency)
    return sandboxed_baseline(root / f"sandboxed-{time.monotonic_ns()}", count, concurrency) or 0.0, None


@contextlib.contextmanager
def code_from(checkout: str) -> Iterator[None]:
    """Servers started meanwhile run the code of `checkout` (PYTHONPATH comes first on sys.path,
    before this checkout's editable install)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(Path(checkout).resolve())
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def report_throughput(count: int, label: str, sandbox: str, run: dict[str, float], direct: float) -> None:
    """One engine run against its own baseline, measured right after it."""
    engine = run["engine_s"]
    print(
        f"{count} one-worker `true` jobs at concurrency {run['concurrency']:.0f}, sandbox {sandbox}{label}: "
        f"engine {engine:.2f} s (first start to last end; submitting took {run['submit_phase_s']:.2f} s), "
        f"direct {'`true`' if sandbox == 'off' else '`bwrap … true`'} right after {direct:.2f} s: "
        f"ratio {engine / direct if direct else 0.0:.2f}x (target <= 3x); engine CPU "
        f"{run['engine_cpu_s']:.1f} s (its start-up included) + its workers {run['workers_cpu_s']:.1f} s; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    database = run["database_cpu_s"]
    print(
        f"  CPU while it ran: engine {run['engine_run_cpu_s']:.2f} s, "
        f"its workers {run['workers_cpu_s']:.2f} s, "
        f"PostgreSQL {'-' if database < 0 else f'{database:.2f} s'}, the API answering this script's polls "
        f"{run['api_cpu_s']:.2f} s; {engine:.2f} s on {os.cpu_count()} cores is "
        f"{engine * (os.cpu_count() or 1):.2f} CPU-s",
        flush=True,
    )


def bench_sleepers(root: Path, count: int, sandbox: str) -> dict[str, float]:
    with server_factory(root / f"sleepers-{sandbox}") as servers:
        quotas = f"{count},8,5,3,2,1"
        server = servers.start(
            ORCHESTRATOR_AGENTS_FILE=profiles(servers.root),
            ORCHESTRATOR_QUOTAS=quotas,
            ORCHESTRATOR_SANDBOX=sandbox,
        )
        assert server.process is not None
        pid = server.process.pid
        started = time.perf_counter()
        asyncio.run(submit_many(server, count, {"task_description": "t", "agent": "sleep"}))
        with server.client() as client:
            deadline = time.monotonic() + 300
            while client.get("/api/supervisor/metrics").json()["by_status"]["RUNNING"] < count:
                if time.monotonic() > deadline:
                    raise TimeoutError("sleepers did not all start")
                time.sleep(0.2)
            ramp = time.perf_counter() - started
            time.sleep(2)  # let start-up work settle
            cpu_before, wall_before = cpu_seconds(pid), time.perf_counter()
            time.sleep(15)
            cpu = (cpu_seconds(pid) - cpu_before) / (time.perf_counter() - wall_before) * 100
            memory = rss_mib(pid)
            ids = [j["id"] for j in client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]]
            for job_id in ids:
                client.post(f"/api/jobs/{job_id}/cancel")
    return {"workers": count, "ramp_s": ramp, "idle_cpu_percent": cpu, "server_rss_mib": memory}


def report_floor(run: dict[str, float], direct: float, direct_cpu: float | None) -> None:
    """What 3x of the direct run leaves on this machine's cores, against the CPU the engine's
    workers and PostgreSQL took by themselves: while the two alone take more, no engine reaches
    3x here, whatever its own cost."""
    cores = os.cpu_count() or 1
    others = run["workers_cpu_s"] + max(run["database_cpu_s"], 0.0)
    shown = f"direct run's CPU {direct_cpu:.2f} s; " if direct_cpu is not None else ""
    print(
        f"  floor: {shown}3x of the direct run is {3 * direct * cores:.2f} CPU-s on {cores} cores; "
        f"the workers and the database alone took {others:.2f} CPU-s, "
        f"the engine {run['engine_run_cpu_s']:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["latency", "throughput", "sleepers"], default=None)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--sleepers", type=int, default=1000)
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="depth-0 quota for the throughput run (default: the shipped 10)",
    )
    parser.add_argument(
        "--sandbox",
        choices=["on", "off", "both"],
        default="both",
        help="the worker sandbox of the engine runs (both: each part once without, once with it)",
    )
    parser.add_argument(
        "--before",
        default=None,
        help="a checkout of the code to compare with (a second worktree): its engine runs too, "
        "in the same run, interleaved (the servers get PYTHONPATH pointing at it)",
    )
    args = parser.parse_args()
    modes = ["off", "on"] if args.sandbox == "both" else [args.sandbox]
    print(
        f"database: {os.environ.get('TEST_DATABASE', 'sqlite')}, cores: {os.cpu_count()}, "
        f"load average at start: {os.getloadavg()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sandbox in modes if args.only in (None, "latency") else []:
            for label, checkout in ([("before", args.before)] if args.before else []) + [("", None)]:
                with code_from(checkout) if checkout else contextlib.nullcontext():
                    latency = bench_latency(root / (label or "this"), args.latency_jobs, sandbox)
                print(
                    f"submit-to-RUNNING over {args.latency_jobs} jobs, sandbox {sandbox}"
                    f"{' (before)' if label else ''}: p50 {latency['p50_ms']:.1f} ms, "
                    f"p99 {latency['p99_ms']:.1f} ms, max {latency['max_ms']:.1f} ms "
                    "(target p50 <= 30, p99 <= 150; PostgreSQL p99 <= 30)"
                )
        if args.only in (None, "throughput"):
            for sandbox in modes:
                for label, checkout in ([(" (before)", args.before)] if args.before else []) + [("", None)]:
                    where = root / (label.strip(" ()") or "this")
                    with code_from(checkout) if checkout else contextlib.nullcontext():
                        run = bench_throughput(where, args.jobs, args.concurrency, sandbox)
                    direct, direct_cpu = fair_baseline(root, args.jobs, int(run["concurrency"]), sandbox)
                    report_throughput(args.jobs, label, sandbox, run, direct)
                    report_floor(run, direct, direct_cpu)
            alone = executor_baseline(root / "executor-only", args.jobs, int(run["concurrency"]))
            print(f"the executor alone (same workers, no database, no sandbox): {alone:.2f} s")
        for sandbox in modes if args.only in (None, "sleepers") else []:
            sleepers = bench_sleepers(root, args.sleepers, sandbox)
            print(
                f"{args.sleepers} sleeping workers, sandbox {sandbox}: "
                f"started in {sleepers['ramp_s']:.1f} s, "
                f"server at {sleepers['idle_cpu_percent']:.1f}% of one core (target < 10%), "
                f"RSS {sleepers['server_rss_mib']:.0f} MiB"
            )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
