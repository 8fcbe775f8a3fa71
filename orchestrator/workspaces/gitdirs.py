"""A worker worktree's git dirs, recorded before its agent first runs and trusted from then on.

A linked worktree finds its repository through its `.git` file (`gitdir: …`) and its own git
dir's `commondir` file: both are the agent's to rewrite once it runs. Everything the engine does
later with the worktree (the bind mounts of a resumed worker, the commit of its work when it
ends, a checkpoint before its child starts) uses the dirs recorded at the first start, in the
run dir (outside the sandbox), and runs git with GIT_DIR, GIT_WORK_TREE and a private index set
explicitly, so no file the agent wrote picks the repository, the branch or a file git writes as
the server's user. The commit is made with plumbing (`write-tree`, `commit-tree`, `update-ref`
in the common dir): porcelain `git commit` writes COMMIT_EDITMSG and the HEAD reflog into the
worktree's own git dir, through any symlink the agent put there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from stat import S_ISREG

from orchestrator.workspaces.git import ADD_ALL, ADD_ALL_OK, GitError, commit_all, run_git, worktree_git_dirs

# In a directory of the run dir: the engine binds the run dir's top-level files (an agent's MCP
# config) read-only into the sandbox; these are the server's alone.
RECORD_FILE = "engine/git-dirs.json"
INDEX_FILE = "engine/index"


def record(worktree: Path, run_dir: Path) -> tuple[Path, Path] | None:
    """(own git dir, common git dir) of the worker's worktree: the recorded ones if a start
    recorded them, else read from its `.git` file now and recorded (call it before the agent
    first runs, right after the engine made the worktree). None if it is not a linked worktree,
    which is recorded too: a scratch directory the agent later gives a `.git` file (pointing at
    a directory it made, whose `commondir` names any directory of the host) is never taken for
    a worktree when the worker is started again."""
    path = run_dir / RECORD_FILE
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        data = None
    if isinstance(data, dict):
        return recorded(run_dir)
    dirs = worktree_git_dirs(worktree)
    own, common = dirs if dirs is not None else (None, None)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {"worktree": str(worktree), "git_dir": own and str(own), "common_dir": common and str(common)},
            handle,
        )
    os.replace(temporary, path)
    return dirs


def recorded(run_dir: Path) -> tuple[Path, Path] | None:
    try:
        data = json.loads((run_dir / RECORD_FILE).read_text())
        return Path(data["git_dir"]), Path(data["common_dir"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def commit_worker(
    worktree: Path,
    run_dir: Path,
    message: str,
    base_commit: str | None,
    branch: str,
    skipped: list[str] | None = None,
    max_file_mb: int | None = None,
) -> tuple[str, str]:
    """Commit what a worker left in its worktree onto its branch; returns (the branch's commit,
    diff stat vs base). Through the recorded git dirs; a worker started before they were
    recorded falls back to the worktree's own view (`git.commit_all`). Files of `max_file_mb`
    or more are left out, their paths added to `skipped`: git would read them whole (a sparse
    terabyte costs the agent nothing), and one the agent's RLIMIT_FSIZE stopped is likely cut."""
    if not (run_dir / RECORD_FILE).exists():
        return commit_all(worktree, message, base_commit, branch)
    big = too_big(worktree, max_file_mb << 20) if max_file_mb else []
    if skipped is not None:
        skipped += big
    return commit_recorded(worktree, run_dir, message, base_commit, branch, big)


def too_big(worktree: Path, limit: int) -> list[str]:
    """The worktree's regular files of `limit` bytes or more (symlinks not followed, `.git` skipped),
    relative to it."""
    found: list[str] = []
    for top, dirs, files in os.walk(worktree):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            path = os.path.join(top, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if S_ISREG(info.st_mode) and info.st_size >= limit:
                found.append(os.path.relpath(path, worktree))
    return sorted(found)


def commit_recorded(
    worktree: Path,
    run_dir: Path,
    message: str,
    base_commit: str | None,
    branch: str,
    leave_out: list[str] | None = None,
) -> tuple[str, str]:
    """Commit the worktree's content (but `leave_out`) onto `branch` in the recorded repository.
    Git runs with the common dir as GIT_DIR, the worktree as GIT_WORK_TREE and a fresh index in the
    run dir: the
    worktree's own git dir (HEAD, index, logs, COMMIT_EDITMSG: all the agent's) is not read or
    written. Raises GitError if nothing was recorded."""
    dirs = recorded(run_dir)
    if dirs is None:
        raise GitError(f"no git dirs were recorded for worktree {worktree}")
    _, common = dirs
    if common.is_symlink() or not (common / "objects").is_dir():
        raise GitError(f"worktree {worktree}: its recorded repository {common} is gone or replaced")
    ref = f"refs/heads/{branch}"
    index = run_dir / INDEX_FILE
    index.parent.mkdir(mode=0o700, exist_ok=True)
    index.unlink(missing_ok=True)
    shared = {"GIT_DIR": str(common)}
    view = {**shared, "GIT_WORK_TREE": str(worktree), "GIT_INDEX_FILE": str(index)}
    parent = run_git("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}", cwd=common, env=shared)
    try:
        run_git("read-tree", parent, cwd=worktree, env=view)
        _add_all(worktree, view, index, leave_out or [])
        tree = run_git("write-tree", cwd=worktree, env=view)
    finally:
        index.unlink(missing_ok=True)
    head = parent
    if tree != run_git("rev-parse", f"{parent}^{{tree}}", cwd=common, env=shared):
        head = run_git("commit-tree", tree, "-p", parent, "-m", message, cwd=common, env=shared)
        run_git("update-ref", "-m", message, ref, head, parent, cwd=common, env=shared)
    stat = (
        run_git("diff", "--shortstat", base_commit, head, "--", cwd=common, env=shared) if base_commit else ""
    )
    return head, stat


def _add_all(worktree: Path, view: dict[str, str], index: Path, leave_out: list[str]) -> None:
    """`git add -A`, but the paths of `leave_out` (as the parent commit has them, or absent):
    exclude pathspecs in a file beside the index, however many there are."""
    if not leave_out:
        run_git(*ADD_ALL, cwd=worktree, env=view, ok=ADD_ALL_OK)
        return
    specs = index.with_suffix(".pathspecs")
    excluded = [f":(exclude,literal){path}" for path in leave_out]
    specs.write_bytes(b"".join(os.fsencode(spec) + b"\0" for spec in [".", *excluded]))
    try:
        add = (*ADD_ALL[:-2], f"--pathspec-from-file={specs}", "--pathspec-file-nul")
        run_git(*add, cwd=worktree, env=view, ok=ADD_ALL_OK)
    finally:
        specs.unlink(missing_ok=True)
