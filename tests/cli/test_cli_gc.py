"""`orchestrator gc` on seeded rows: git worktrees removed with git (branches kept), live work untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cli.support import cli_env, ok, ok_json
from tests.support.db import seed_worker, set_job_status
from tests.support.servers import ServerFactory


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_gc_removes_worktrees_of_final_jobs_only(servers: ServerFactory, tmp_path: Path) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false")
    env = cli_env(tmp_path, server)
    data_dir = Path(server.env["ORCHESTRATOR_DATA_DIR"])
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "README").write_text("hello\n")
    git(repo, "add", "README")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")

    done_job = ok_json(env, "submit", "finished work")["id"]
    live_job = ok_json(env, "submit", "ongoing work")["id"]
    done_worker = seed_worker(server, done_job, status="COMPLETED", branch=f"orchestrator/{done_job}/x")
    live_worker = seed_worker(server, live_job, status="RUNNING")
    set_job_status(server, done_job, "COMPLETED")

    worktree = data_dir / "workspaces" / done_worker
    git(repo, "worktree", "add", "-q", "-b", f"orchestrator/{done_job}/x", str(worktree))
    (worktree / "work.txt").write_text("done\n")
    for worker in (done_worker, live_worker):
        (data_dir / "runs" / worker / "home").mkdir(parents=True)
    (data_dir / "workspaces" / live_worker).mkdir(parents=True)

    dry = ok(env, "gc", "--dry-run")
    assert "would remove worktree" in dry and done_worker in dry and live_worker not in dry
    assert worktree.exists()

    out = ok(env, "gc")
    assert f"removed worktree {worktree}" in out
    assert not worktree.exists() and not (data_dir / "runs" / done_worker).exists()
    assert str(worktree) not in git(repo, "worktree", "list")
    assert f"orchestrator/{done_job}/x" in git(repo, "branch", "--list"), "the branch keeps the work"
    assert (data_dir / "runs" / live_worker).exists() and (data_dir / "workspaces" / live_worker).exists()
    assert "Nothing to collect" in ok(env, "gc")
