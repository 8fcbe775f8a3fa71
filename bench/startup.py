"""How long a server takes from its start to `/ready`, and the CPU that costs (its engine's start
included): every `uvicorn` process of a deployment pays it at each start and restart, and so does
every server the test suite starts.

    .venv/bin/python bench/startup.py [--rounds 5] [--compare DIR]

Each round starts a real `uvicorn orchestrator.api.main:app` on a new SQLite data dir (the
default, local executor), polls `/ready` every 10 ms until it answers 200, and reads the process's
user + system CPU from /proc at that moment. `--compare DIR` (DIR holding another version's
`orchestrator` package) starts that version right after this checkout's in each round, so the
two are compared minutes apart at most.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.servers import TEST_SECRET_KEY, server_factory  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_to_ready(code: Path | None) -> tuple[float, float]:
    """Seconds from the server's start to its first 200 from /ready, and its CPU seconds then."""
    os.environ["TEST_DATABASE"] = "sqlite"
    extra = {"PYTHONPATH": str(code)} if code is not None else {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp, server_factory(Path(tmp)) as servers:
        server = servers.make(**extra)
        started = time.monotonic()
        server.start(timeout=120)
        assert server.process is not None
        deadline = started + 120
        while True:
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server never became ready:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=10.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        return time.monotonic() - started, cpu_seconds(server.process.pid)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another version's orchestrator package's parent")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    results: dict[str, list[tuple[float, float]]] = {"this": [], "compared": []}
    for round_ in range(1, args.rounds + 1):
        versions: list[tuple[str, Path | None]] = [("this", None)]
        if args.compare:
            versions.append(("compared", args.compare))
        for version, code in versions:
            wall, cpu = start_to_ready(code)
            results[version].append((wall, cpu))
            shown = f"start to /ready {wall:.2f} s, server CPU {cpu:.2f} s"
            print(f"round {round_} {version:8}  {shown}", flush=True)
    for version, runs in results.items():
        if runs:
            walls, cpus = [wall for wall, _ in runs], [cpu for _, cpu in runs]
            print(
                f"{version:8} median: start to /ready {statistics.median(walls):.2f} s "
                f"(min {min(walls):.2f}), CPU {statistics.median(cpus):.2f} s (min {min(cpus):.2f})"
            )
    print(f"load average at end: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
