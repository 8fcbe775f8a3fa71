"""Worker start overhead with and without the sandbox, side by side in one run.

Each run starts one worker through the executor (wrapper, cgroups, bwrap, setpriv, seccomp)
whose agent is `date +%s.%N`: "call" is how long the executor's start call blocks its caller
(an engine launcher thread), "start" the time from that call to the moment the agent runs (the
clock it prints), "run" the time to its exit (with the sandbox's teardown).
Runs alternate between the modes so all see the same machine load: no sandbox; the sandbox
with a parked wrapper (executors/pool.py; the pool is refilled between starts); the sandbox
without the pool (the wrapper joins its cgroups on the start path). Also `bwrap … true` and
plain `true` spawned directly, the sandbox's own cost.

    .venv/bin/python bench/sandbox.py --runs 100
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors import cgroups, sandbox
from orchestrator.executors.cgroups import Limits
from orchestrator.executors.local import LocalExecutor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    host = sandbox.detect(root / "data")
    if not host.usable:
        raise SystemExit(f"sandbox unavailable: {host.problem}")
    groups = cgroups.detect()
    boxed, plain = LocalExecutor(host, groups), LocalExecutor()
    unpooled = LocalExecutor(host, groups, pool_size=0)
    modes = [("no sandbox", plain), ("sandbox", boxed), ("sandbox, no pool", unpooled)]
    times: dict[str, list[float]] = {
        f"{what}, {mode}": [] for what in ("call", "start", "run", "cpu") for mode, _ in modes
    }
    times.update({"true": [], "bwrap true": []})
    spec = LaunchSpec(argv=["/bin/date", "+%s.%N"])
    for i in range(args.runs):
        for n, (name, executor) in enumerate(modes):
            workdir, run_dir = root / f"w{i}-{n}", root / f"r{i}-{n}"
            home = run_dir / "home"
            home.mkdir(parents=True)
            workdir.mkdir()
            box = sandbox.SandboxSpec(workdir, home)
            if executor is not plain:
                sandbox.give_to_agent(host, workdir, home)
            if executor.pool is not None:
                executor.pool.fill(30)  # steady state: a start finds a parked wrapper (a burst may not)
            limits = Limits(128, 64) if executor is not plain else None
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, started = time.time(), time.perf_counter()
            proc = executor.start(f"bench{i}-{n}", spec, workdir, run_dir, sandbox=box, limits=limits)
            times[f"call, {name}"].append(time.perf_counter() - started)
            executor.wait(proc, 30)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            times[f"cpu, {name}"].append(cpu)  # of the worker's processes: independent of load
            times[f"run, {name}"].append(time.perf_counter() - started)
            times[f"start, {name}"].append(float((run_dir / "output.log").read_text()) - wall)
            if executor is not plain:
                executor.ending(f"bench{i}-{n}")
        started = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        times["true"].append(time.perf_counter() - started)
        argv = sandbox.command(host, sandbox.SandboxSpec(root, root), ["/bin/true"])
        started = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", 'exec "$@" 9<"$0"', str(host.seccomp), *argv], check=True)
        times["bwrap true"].append(time.perf_counter() - started)
    for name, values in times.items():
        values.sort()
        p50, p90 = statistics.median(values), values[int(len(values) * 0.9) - 1]
        print(f"{name:>18}: p50 {p50 * 1000:6.1f} ms  p90 {p90 * 1000:6.1f} ms  ({len(values)} runs)")
    for what in ("call", "start", "run", "cpu"):
        for mode in ("sandbox", "sandbox, no pool"):
            overhead = statistics.median(times[f"{what}, {mode}"]) - statistics.median(
                times[f"{what}, no sandbox"]
            )
            print(f"{mode} {what} overhead (p50): {overhead * 1000:+.1f} ms")
    boxed.close()


if __name__ == "__main__":
    main()
