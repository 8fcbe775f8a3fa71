"""How long integrating a job's result branch takes: 10 worker branches of small changes.

    .venv/bin/python bench/integrate.py [--repeat 5] [--workers 10]

Two figures. `git work`: the integration's git work alone, as the engine does it without
conflicts (one in-memory merge per worker branch, `merge-tree` + `commit-tree`, then the result
ref written: orchestrator/workspaces/merge.py), on a repository of 200 files. `end to end`:
a real server and real workers (`sh` writing one file each) on SQLite; from the last worker's
`finished_at` to the job's `finished_at`: the engine noticing, taking the repository lock,
merging, recording, and settling the job COMPLETED.
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

from orchestrator.workspaces import merge  # noqa: E402
from tests.support.servers import TEST_SECRET_KEY, server_factory  # noqa: E402

os.environ["SECRET_KEY"] = TEST_SECRET_KEY


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}  # fmt: skip
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_repo(root: Path, files: int = 200) -> Path:
    repo = root / "project"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for i in range(files):
        (repo / f"src-{i:03d}.txt").write_text(f"file {i}\n" * 20)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    return repo


def git_work(root: Path, workers: int) -> float:
    repo = make_repo(root)
    base = git(repo, "rev-parse", "HEAD")
    branches = []
    for index in range(workers):
        branch = f"orchestrator/j_bench/w_{index:012d}"
        git(repo, "branch", branch, base)
        tree = root / f"w{index}"
        git(repo, "worktree", "add", "-q", str(tree), branch)
        (tree / f"work-{index}.txt").write_text(f"worker {index}\n")
        with (tree / f"src-{index:03d}.txt").open("a") as handle:
            handle.write(f"changed by worker {index}\n")
        git(tree, "add", "-A")
        git(tree, "commit", "-qm", f"work {index}")
        branches.append(branch)
    started = time.perf_counter()
    commit = base
    for branch in branches:
        step = merge.merge_in_memory(repo, commit, branch, f"merge {branch}")
        assert step is not None and step.merge_commit, step
        commit = step.merge_commit
    merge.publish(repo, "orchestrator/j_bench/result", commit)
    return time.perf_counter() - started


def end_to_end(workers: int, repeat: int) -> list[float]:
    from tests.support.servers import token  # noqa: F401 (the factory's clients use it)

    gaps = []
    with tempfile.TemporaryDirectory() as tmp, server_factory(Path(tmp)) as servers:
        profile = Path(tmp) / "agents.toml"
        profile.write_text('[agents.writer]\ncommand = ["sh", "-c", "echo w > work-$WORKER_INDEX.txt"]\n')
        repo = make_repo(Path(tmp))
        server = servers.start(ORCHESTRATOR_AGENTS_FILE=str(profile))
        with server.client() as client:
            for _ in range(repeat):
                job = client.post(
                    "/api/jobs/submit",
                    json={
                        "task_description": "bench",
                        "worker_count": workers,
                        "agent": "writer",
                        "repository": str(repo),
                    },
                ).json()
                while (done := client.get(f"/api/jobs/{job['id']}").json())["status"] not in (
                    "COMPLETED", "FAILED", "CANCELED",
                ):  # fmt: skip
                    time.sleep(0.02)
                assert done["status"] == "COMPLETED", done
                rows = client.get(
                    "/api/supervisor/workers", params={"job_id": job["id"], "limit": 100}
                ).json()
                last = max(datetime.fromisoformat(w["finished_at"]) for w in rows["workers"])
                gaps.append((datetime.fromisoformat(done["finished_at"]) - last).total_seconds())
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=10)
    args = parser.parse_args()
    times = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            times.append(git_work(Path(tmp), args.workers))
    print(f"git work, {args.workers} branches: " + ", ".join(f"{t:.3f}" for t in times)
          + f" s (median {statistics.median(times):.3f} s)")  # fmt: skip
    gaps = end_to_end(args.workers, args.repeat)
    print(f"end to end (last worker finished -> job COMPLETED), {args.workers} workers: "
          + ", ".join(f"{t:.3f}" for t in gaps) + f" s (median {statistics.median(gaps):.3f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
