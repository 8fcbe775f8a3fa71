"""The git dirs of a worker's worktree are recorded once, before its agent runs (workspaces/gitdirs.py):
what the agent writes later (a `.git` file, a fake git dir whose `commondir` names a host
directory) is never read when the worker starts again."""

from __future__ import annotations

import subprocess
from pathlib import Path

from orchestrator.workspaces import gitdirs


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def forge(worktree: Path, target: Path) -> None:
    """What a hostile agent can write in its own directory: a git dir pointing anywhere."""
    fake = worktree / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "commondir").write_text(str(target) + "\n")
    (worktree / ".git").write_text(f"gitdir: {fake}\n")


def test_a_scratch_dir_is_recorded_as_no_worktree(tmp_path: Path) -> None:
    scratch, run_dir, secret = tmp_path / "scratch", tmp_path / "run", tmp_path / "secret"
    for path in (scratch, run_dir, secret):
        path.mkdir()
    assert gitdirs.record(scratch, run_dir) is None  # first start: nothing to record
    forge(scratch, secret)
    assert gitdirs.record(scratch, run_dir) is None  # a later start does not read the forgery


def test_a_worktree_keeps_the_dirs_of_its_first_start(tmp_path: Path) -> None:
    repo, other, run_dir = tmp_path / "repo", tmp_path / "other", tmp_path / "run"
    for path in (repo, other):
        path.mkdir()
        git(path, "init", "-q", "-b", "main")
        git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    run_dir.mkdir()
    worktree = tmp_path / "w_1"
    git(repo, "worktree", "add", "-q", "-b", "orchestrator/j/w_1", str(worktree))
    first = gitdirs.record(worktree, run_dir)
    assert first == (repo / ".git" / "worktrees" / "w_1", (repo / ".git").resolve())
    forge(worktree, other / ".git")
    assert gitdirs.record(worktree, run_dir) == first
    (worktree / "work.txt").write_text("mine\n")
    commit, _ = gitdirs.commit_worker(worktree, run_dir, "work", None, "orchestrator/j/w_1")
    shown = subprocess.run(
        ["git", "show", f"{commit}:work.txt"], cwd=repo, check=True, capture_output=True, text=True
    )
    assert shown.stdout == "mine\n"
    branches = subprocess.run(["git", "branch", "--list"], cwd=other, capture_output=True, text=True)
    assert "orchestrator" not in branches.stdout
