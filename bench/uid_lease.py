"""What a uid per worker (executors/uids.py) costs a sandboxed start, side by side in one run.

Runs alternate between a sandboxed executor without parked wrappers that leases a uid per
worker (what a root server does) and the same executor with the lease switched off (every
worker as the range's first uid: the behaviour before leases), so both see the same machine
load. Each run starts one worker whose agent is `date +%s.%N` and waits for it to end: "call"
is how long the start call blocks the engine's launcher thread, "run" the time to its exit.
Also the lease alone (take + close of a free uid) and the load average.

    .venv/bin/python bench/uid_lease.py --runs 100
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors import cgroups, sandbox, uids
from orchestrator.executors.cgroups import Limits
from orchestrator.executors.local import LocalExecutor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    print("load average before:", os.getloadavg())
    root = Path(tempfile.mkdtemp(prefix="bench-uids-"))
    base = random.randrange(100_000, 2**31 - 10_000, 1000)  # a range of its own
    host = sandbox.detect(root / "data", uid=base, uid_count=4096)
    if not host.usable or host.uid is None:
        raise SystemExit(f"needs a root server's sandbox: {host.problem or 'not root'}")
    groups = cgroups.detect()
    leased, shared = LocalExecutor(host, groups, pool_size=0), LocalExecutor(host, groups, pool_size=0)
    shared.uids = None
    modes = [("uid per worker", leased), ("one shared uid", shared)]
    times: dict[str, list[float]] = {f"{what}, {mode}": [] for what in ("call", "run") for mode, _ in modes}
    times["lease alone"] = []
    spec = LaunchSpec(argv=["/bin/date", "+%s.%N"])
    assert leased.uids is not None
    for i in range(args.runs):
        for n, (name, executor) in enumerate(modes):
            workdir, run_dir = root / f"w{i}-{n}", root / f"r{i}-{n}"
            home = run_dir / "home"
            home.mkdir(parents=True)
            workdir.mkdir()
            if executor is shared:
                sandbox.give_to_agent(host, workdir, home)  # what the launcher did before leases
            box = sandbox.SandboxSpec(workdir, home)
            started = time.perf_counter()
            proc = executor.start(
                f"bench{i}-{n}", spec, workdir, run_dir, sandbox=box, limits=Limits(128, 64)
            )
            times[f"call, {name}"].append(time.perf_counter() - started)
            executor.wait(proc, 30)
            times[f"run, {name}"].append(time.perf_counter() - started)
            executor.ending(f"bench{i}-{n}")
        started = time.perf_counter()
        leased.uids.lease().close()
        times["lease alone"].append(time.perf_counter() - started)
    for name, values in times.items():
        values.sort()
        p50, p90 = statistics.median(values), values[int(len(values) * 0.9) - 1]
        print(f"{name:>22}: p50 {p50 * 1000:7.2f} ms  p90 {p90 * 1000:7.2f} ms  ({len(values)} runs)")
    for what in ("call", "run"):
        extra = statistics.median(times[f"{what}, uid per worker"]) - statistics.median(
            times[f"{what}, one shared uid"]
        )
        print(f"uid per worker {what} overhead (p50): {extra * 1000:+.2f} ms")
    print("load average after:", os.getloadavg())
    uids.forget(uids.LEASE_DIR, range(base, base + 4096))


if __name__ == "__main__":
    main()
