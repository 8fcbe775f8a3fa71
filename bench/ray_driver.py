"""What the engine's Ray driver in a process of its own (executors/ray_driver.py) costs, against
a driver in the engine's process (as before), side by side in one run on one local cluster.

    .venv/bin/python bench/ray_driver.py [--calls 2000] [--actors 20] [--rounds 200]

1. one actor call and its answer (`get(actor.node_gone.remote())`), sequential: wall time per
   call, and the CPU it costs (the engine's process, plus the driver's for the child);
2. a watcher's poll round over `--actors` actors, as ray_watch.py makes one every 0.25 s: in
   the engine, each asked, one `wait` for all, each answer read; through the driver process,
   all of that in one call (`RayDriver.poll_round`): wall time and CPU per round.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every address on loopback (tests/ray)

from ray import cluster_utils  # noqa: E402

from orchestrator.executors.ray_driver import RayDriver  # noqa: E402
from orchestrator.executors.ray_node import WorkerNode  # noqa: E402

NAMESPACE = "bench"
CLOCK = os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK


def measure(work: Callable[[], None], child: int | None) -> tuple[float, float]:
    """Wall and CPU seconds of `work` (this process, plus the child's if any)."""
    cpu = own_cpu() + (process_cpu(child) if child else 0.0)
    wall = time.perf_counter()
    work()
    wall = time.perf_counter() - wall
    return wall, own_cpu() + (process_cpu(child) if child else 0.0) - cpu


def run(label: str, ray: Any, actors: list[Any], calls: int, rounds: int, child: int | None) -> None:
    first = actors[0]
    ray.get(first.node_gone.remote())  # warm

    def sequential() -> None:
        for _ in range(calls):
            ray.get(first.node_gone.remote())

    def poll_rounds() -> None:
        for _ in range(rounds):
            if isinstance(ray, RayDriver):  # as ray_watch.py: one round trip for the round
                keys = [str(n) for n in range(len(actors))]
                asks = [(key, actor, "node_gone", ()) for key, actor in zip(keys, actors, strict=True)]
                answers, _ = ray.poll_round(asks, keys, 30)
                assert len(answers) == len(actors)
                continue
            refs = [actor.node_gone.remote() for actor in actors]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30)
            for ref in ready:
                ray.get(ref)

    wall, cpu = measure(sequential, child)
    print(
        f"{label:>18}: one call {wall / calls * 1e6:7.0f} us wall, {cpu / calls * 1e6:7.0f} us CPU",
        flush=True,
    )
    wall, cpu = measure(poll_rounds, child)
    print(
        f"{label:>18}: a round of {len(actors)} {wall / rounds * 1e3:6.2f} ms wall, "
        f"{cpu / rounds * 1e3:6.2f} ms CPU ({cpu / rounds / 0.25 * 100:4.1f} % of a core at 4 rounds/s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--actors", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, resources={"agent_slot": 2 * args.actors}, node_ip_address="127.0.0.1")
        options = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": False}
        import ray

        ray.init(address=cluster.address, namespace=NAMESPACE, **options)
        in_process = ray.remote(WorkerNode)
        driver = RayDriver()
        driver.init(address=cluster.address, namespace=NAMESPACE, **options)
        assert driver.process is not None
        child_class = driver.remote(WorkerNode)
        common = {"namespace": NAMESPACE, "num_cpus": 0, "resources": {"agent_slot": 1}}
        here = [in_process.options(name=f"here-{n}", **common).remote() for n in range(args.actors)]  # type: ignore[attr-defined]
        there = [child_class.options(name=f"there-{n}", **common).remote() for n in range(args.actors)]
        for _ in range(3):  # alternated, so that neither has the machine's quieter moments only
            run("in the engine", ray, here, args.calls, args.rounds, None)
            run("a process apart", driver, there, args.calls, args.rounds, driver.process.pid)
        driver.stop()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
