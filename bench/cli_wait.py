"""How long `orchestrator submit --wait` takes, end to end, for a short simulated job.

    .venv/bin/python bench/cli_wait.py [--repeat 5] [--durations 0.3,0.6,0.9]

The wall time of the whole CLI process (interpreter start, submit, wait, final output) for jobs
whose one simulated worker works `duration_seconds`, once with `--json` and once with the plain
tree output. A CLI that only polls returns at its next poll after the job ends; one that follows
the job's events stream returns when it ends, so the gap shows at durations that end just after
a poll.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.servers import TEST_SECRET_KEY, server_factory  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY  # the token made here must verify in the server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--durations", default="0.3,0.6,0.9")
    args = parser.parse_args()
    from tests.support.servers import token

    orchestrator = str(Path(sys.executable).parent / "orchestrator")
    with tempfile.TemporaryDirectory() as tmp, server_factory(Path(tmp)) as servers:
        server = servers.start()
        env = {**os.environ, "ORCHESTRATOR_URL": server.url, "ORCHESTRATOR_TOKEN": token()}
        for duration in args.durations.split(","):
            for output in (["--json"], []):
                walls = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    argv = [orchestrator, "submit", "bench", "-o", f"duration_seconds={duration}", "--wait"]
                    done = subprocess.run(
                        [*argv, *output],
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    walls.append(time.perf_counter() - started)
                    if done.returncode != 0:
                        raise SystemExit(done.stdout + done.stderr)
                print(
                    f"duration_seconds={duration} {' '.join(output) or '(tree)':7s} "
                    f"median {statistics.median(walls):.2f} s over {args.repeat} "
                    f"(min {min(walls):.2f}, max {max(walls):.2f})"
                )


if __name__ == "__main__":
    main()
