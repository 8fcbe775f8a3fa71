"""Git repositories and worktrees for workers."""

from __future__ import annotations

from pathlib import Path

from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest


def resolve_repository(settings: Settings, repository: str) -> Path:
    """The repository's real path, if it is a git work tree under an allowed root."""
    path = Path(repository).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    roots = settings.repo_roots
    if not any(path == root or path.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise BadRequest(
            f"Repository {path} is not under an allowed root ({allowed}); see ORCHESTRATOR_REPO_ROOTS"
        )
    if not (path / ".git").exists():
        raise BadRequest(f"Repository {path} is not a git repository (no .git)")
    return path


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Parallel AI Orchestrator",
    "GIT_AUTHOR_EMAIL": "orchestrator@localhost",
    "GIT_COMMITTER_NAME": "Parallel AI Orchestrator",
    "GIT_COMMITTER_EMAIL": "orchestrator@localhost",
}


class GitError(RuntimeError):
    pass


def _git(*args: str, cwd: Path) -> str:
    import os
    import subprocess

    env = {**os.environ, **GIT_IDENTITY, "GIT_TERMINAL_PROMPT": "0"}
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES"):
        env.pop(name, None)
    done = subprocess.run(
        ["git", *HARDENED, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


# The engine runs git as the server's user in worktrees a sandboxed agent (another uid) has
# written: no hooks, no fsmonitor command, no "dubious ownership" refusal. The agent cannot change
# the repository's config (its common git dir is read-only in the sandbox).
HARDENED = ("-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


def worktree_git_dirs(worktree: Path) -> tuple[Path, Path] | None:
    """(the worktree's own git dir, the repository's common git dir), from the `.git` file git
    wrote, or None if it is not a linked worktree. Read before the agent runs: later the file is
    the agent's to change."""
    try:
        text = (worktree / ".git").read_text()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if not text.startswith("gitdir: "):
        return None
    own = Path(text[len("gitdir: ") :].strip())
    try:
        common = (own / (own / "commondir").read_text().strip()).resolve()
    except FileNotFoundError:
        return None
    return own, common


def branch_name(job_id: str, worker_id: str) -> str:
    return f"orchestrator/{job_id}/{worker_id}"


def add_worktree(repository: Path, worktree: Path, branch: str, base_ref: str | None) -> str:
    """Create the worker's worktree on a new branch; returns the commit it starts from."""
    base = _git("rev-parse", "--verify", f"{base_ref or 'HEAD'}^{{commit}}", cwd=repository)
    worktree.parent.mkdir(parents=True, exist_ok=True)
    _git("worktree", "add", "-b", branch, str(worktree), base, cwd=repository)
    return base


def commit_all(
    worktree: Path, message: str, base_commit: str | None, branch: str | None = None
) -> tuple[str, str]:
    """Commit whatever the worker left in its worktree; returns (HEAD commit, diff stat vs base).
    With `branch`: HEAD is put back on the worker's own branch first (a sandboxed agent may have
    pointed it at another branch) and the index is rebuilt from HEAD (the agent's index may name
    objects only its private object store holds), so the commit lands on its branch alone."""
    if branch is not None:
        _git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=worktree)
        _git("read-tree", "HEAD", cwd=worktree)
    _git("add", "-A", cwd=worktree)
    if _git("status", "--porcelain", cwd=worktree):
        _git("commit", "-q", "--no-verify", "-m", message, cwd=worktree)
    head = _git("rev-parse", "HEAD", cwd=worktree)
    stat = _git("diff", "--shortstat", f"{base_commit}..HEAD", cwd=worktree) if base_commit else ""
    return head, stat


def remove_worktree(repository: Path, worktree: Path) -> None:
    _git("worktree", "remove", "--force", str(worktree), cwd=repository)
