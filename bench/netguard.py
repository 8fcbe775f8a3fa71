"""The network guard's cost (executors/netguard.py), side by side in one run: TCP connects to a
local port from an agent uid the guard filters (the API port: allowed) against a uid outside its
range (no rule beyond the uid check), and how long an agent waits to learn that a host service is
closed to it. The guard adds nothing to a worker's start: its rules are the host's, installed
once at server start-up. Needs root and nft.

    .venv/bin/python bench/netguard.py --connects 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading

from orchestrator.executors import netguard

CLIENT = r"""
import json, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
times = []
for _ in range(count):
    t = time.perf_counter()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        times.append(time.perf_counter() - t)
    except OSError:
        times.append(-(time.perf_counter() - t))
print(json.dumps(times))
"""


def run_as(uid: int, port: int, count: int) -> list[float]:
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    argv = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c", CLIENT]
    done = subprocess.run([*argv, str(port), str(count)], capture_output=True, text=True, check=True)
    times: list[float] = json.loads(done.stdout)
    return times


def serve(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connects", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    guarded, unguarded = 71000, 79000
    problem = netguard.install(netguard.policy(guarded, 16, None, None))
    if problem is not None:
        raise SystemExit(f"no guard: {problem}")
    print("load average at start:", os.getloadavg())
    api = socket.create_server(("127.0.0.1", 0), backlog=512)
    closed = socket.create_server(("127.0.0.1", 0), backlog=512)
    for server in (api, closed):
        threading.Thread(target=serve, args=(server,), daemon=True).start()
    api_port, closed_port = api.getsockname()[1], closed.getsockname()[1]
    assert netguard.refresh({api_port}) is None
    results: dict[str, list[float]] = {"guarded uid, API port": [], "unguarded uid": []}
    per_round = args.connects // args.rounds
    for _ in range(args.rounds):  # alternating, so both see the same load
        results["guarded uid, API port"] += run_as(guarded, api_port, per_round)
        results["unguarded uid"] += run_as(unguarded, api_port, per_round)
    refused = run_as(guarded, closed_port, 5)
    assert all(t < 0 for t in refused), "a host port was reachable"
    assert all(t > 0 for times in results.values() for t in times), "an allowed connect failed"
    for name, times in results.items():
        ms = sorted(t * 1000 for t in times)
        p50, p90 = statistics.median(ms), ms[int(len(ms) * 0.9)]
        print(f"{name:>24}: connect p50 {p50:.3f} ms  p90 {p90:.3f} ms  ({len(ms)})")
    base = statistics.median(results["unguarded uid"])
    extra = (statistics.median(results["guarded uid, API port"]) - base) * 1e6
    print(f"guard overhead per connect (p50): {extra:+.1f} us")
    wait = statistics.median(-t for t in refused) * 1000
    print(f"a host service closed to an agent: refused after {wait:.0f} ms (p50 of 5)")
    print("load average at end:", os.getloadavg())


if __name__ == "__main__":
    main()
