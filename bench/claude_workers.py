"""Launch-to-done time of real Claude Code workers (the `claude` CLI) against the fake Anthropic API.

    .venv/bin/python bench/claude_workers.py [--repeat 3]

For one worker, and five workers in parallel (one job, worker_count=5): the time from submit to
the job being COMPLETED, measured by the client (submit request sent -> COMPLETED seen, polling
every 20 ms) and by the server (job created_at -> finished_at). Each worker's model answers with
one short text reply. Measured with the orchestrator's MCP delegation tools attached (the default:
the CLI waits for the API's /mcp/ endpoint to connect) and without (`delegation: false`).
Peer reference on this machine (awslabs CAO): 8.1 s for one, 15.4 s for five.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.fake_anthropic import FakeAnthropic, text  # noqa: E402
from tests.support.servers import TEST_SECRET_KEY, Server, server_factory  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY
CAO = {1: 8.1, 5: 15.4}


def install_claude() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "tests" / "fakes" / "install_claude.sh")],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return out.stdout.strip().splitlines()[-1]


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def run_once(server: Server, workers: int, delegation: bool) -> tuple[float, float]:
    with server.client() as client:
        body = {
            "task_description": "say done",
            "agent": "claude-code",
            "worker_count": workers,
            "agent_options": {"delegation": delegation},
        }
        started = time.monotonic()
        job = client.post("/api/jobs/submit", json=body).json()
        while True:
            current = client.get(f"/api/jobs/{job['id']}").json()
            if current["status"] in ("COMPLETED", "FAILED", "CANCELED"):
                break
            time.sleep(0.02)
        wall = time.monotonic() - started
        if current["status"] != "COMPLETED":
            raise SystemExit(f"job {job['id']} ended {current['status']}: {current['status_reason']}")
        server_side = (parse(current["finished_at"]) - parse(current["created_at"])).total_seconds()
        return wall, server_side


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    claude = install_claude()
    with (
        FakeAnthropic(lambda body: text("done")) as fake,
        tempfile.TemporaryDirectory() as tmp,
        server_factory(Path(tmp)) as factory,
    ):
        server = factory.start(
            ORCHESTRATOR_CLAUDE_BIN=claude, ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY="bench-key"
        )
        run_once(server, 1, False)  # warm the page cache (binary, Python modules)
        print(
            f"claude {subprocess.run([claude, '--version'], capture_output=True, text=True).stdout.strip()}"
        )
        print(
            f"{'workers':>7} {'delegation':>10} {'submit->COMPLETED (client)':>27} "
            f"{'server':>8} {'CAO':>6} {'x':>5}"
        )
        for workers in (1, 5):
            for delegation in (True, False):
                runs = [run_once(server, workers, delegation) for _ in range(args.repeat)]
                wall = statistics.median(r[0] for r in runs)
                srv = statistics.median(r[1] for r in runs)
                print(
                    f"{workers:>7} {'MCP on' if delegation else 'off':>10} {wall:>25.2f} s {srv:>6.2f} s "
                    f"{CAO[workers]:>5.1f}s {CAO[workers] / wall:>4.1f}x"
                )


if __name__ == "__main__":
    main()
