"""Git: the one runner every git call goes through, repositories under the allowed roots, worktrees.

Repositories are the users', but worktrees and branches in them are touched by agents, which
are treated as hostile: every call runs with hooks, fsmonitor and signing off (a hook or an
fsmonitor command the agent wrote into a shared config must not run as the server), ignores
GIT_* variables the server was started with (GIT_DIR or GIT_CONFIG_* would redirect it), and
puts `--end-of-options` / `--` before anything that came from a request.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from stat import S_ISREG

from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Parallel AI Orchestrator",
    "GIT_AUTHOR_EMAIL": "orchestrator@localhost",
    "GIT_COMMITTER_NAME": "Parallel AI Orchestrator",
    "GIT_COMMITTER_EMAIL": "orchestrator@localhost",
}

# Command-line config wins over every config file, including one an agent wrote.
SAFE_CONFIG = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "commit.gpgSign=false",
    "-c",
    "tag.gpgSign=false",
    # The engine runs git in worktrees a sandboxed agent (another uid) has written: no "dubious
    # ownership" refusal (only command-line or system config may set this).
    "-c",
    "safe.directory=*",
)


GIT_UMASK = 0o022
# What the engine's commit of a worktree stages: everything, past the paths git cannot take (a
# nested repository without a commit, as `git init` or a project generator leaves one, fails a
# plain `add -A` whole, and the worker's work would be lost). Exit 1: some paths were skipped.
ADD_ALL = ("add", "-A", "--ignore-errors", "--", ".")
ADD_ALL_OK = (0, 1)


class GitError(RuntimeError):
    pass


def git_env() -> dict[str, str]:
    """The server's environment without any GIT_* variable, plus the orchestrator's identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_IDENTITY)
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def run_git(
    *args: str,
    cwd: Path,
    timeout: float = 120.0,
    umask: int = GIT_UMASK,
    env: dict[str, str] | None = None,
    ok: tuple[int, ...] = (0,),
) -> str:
    """Run `git <args>` in `cwd`; its stdout, stripped. Raises GitError on an exit not in `ok`.
    `env`: GIT_* variables the caller sets on purpose (the recorded git dirs of a worktree)."""
    try:
        done = subprocess.run(
            ["git", *SAFE_CONFIG, *args],
            cwd=cwd,
            env={**git_env(), **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            # The server's umask is 077 (its data dir); the repository is the user's and its files
            # are read by sandboxed agents of another uid (the common dir and shared objects, bound
            # read-only): git makes them with the usual modes.
            umask=umask,
        )
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {args[0] if args else ''} timed out after {timeout:g}s") from exc
    if done.returncode not in ok:
        raise GitError(f"git {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def resolve_repository(settings: Settings, repository: str) -> Path:
    """The repository's real top level, if it is a git work tree whose real git dir and common
    dir are also under an allowed root, and that is not inside the orchestrator's data dir.

    A `.git` file (`gitdir: /elsewhere`), a `commondir` file or a symlink could otherwise put the
    repository the engine registers worktrees and branches in outside the roots. The engine
    checks again before each worktree it adds (the files may have changed since the submit).
    Raises BadRequest (400) with the reason."""
    path = Path(repository).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    roots = settings.repo_roots
    _require_under_roots(path, roots, f"Repository {path}")
    if not (path / ".git").exists():
        raise BadRequest(f"Repository {path} is not a git repository (no .git)")
    try:
        # One call each: a path may contain a newline.
        top, git_dir, common_dir = (
            run_git("rev-parse", option, cwd=path, timeout=30)
            for option in ("--show-toplevel", "--absolute-git-dir", "--git-common-dir")
        )
    except GitError as exc:
        raise BadRequest(f"Repository {path} is not a usable git work tree: {str(exc)[-300:]}") from exc
    if Path(top).resolve() != path:
        raise BadRequest(f"Repository {path} is not the top level of its git work tree ({top})")
    real_git_dir, real_common_dir = (path / git_dir).resolve(), (path / common_dir).resolve()
    for what, real in (("git dir", real_git_dir), ("common git dir", real_common_dir)):
        _require_under_roots(real, roots, f"Repository {path}: its {what} {real}")
    data_dir = settings.data_dir
    for inside in (path, real_git_dir, real_common_dir):
        if inside == data_dir or inside.is_relative_to(data_dir):
            raise BadRequest(
                f"Repository {path} is inside the orchestrator's data directory: "
                "workers' worktrees and the server's files cannot be used as repositories"
            )
    return path


def _require_under_roots(path: Path, roots: list[Path], what: str) -> None:
    if not any(path == root or path.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise BadRequest(f"{what} is not under an allowed root ({allowed}); see ORCHESTRATOR_REPO_ROOTS")


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


def add_worktree(repository: Path, worktree: Path, branch: str, start: str) -> None:
    """Create the worker's worktree on a new branch at `start` (a commit id already resolved)."""
    worktree.parent.mkdir(parents=True, exist_ok=True)
    # The worktree is in the data dir (private, umask 077); what git adds to the repository
    # (worktrees/<name>) is bound into the sandbox as the agent's own anyway.
    run_git(
        "worktree", "add", "-b", branch, "--end-of-options", str(worktree), start, cwd=repository, umask=0o077
    )


def commit_all(
    worktree: Path, message: str, base_commit: str | None, branch: str | None = None
) -> tuple[str, str]:
    """Commit whatever the worker left in its worktree; returns (HEAD commit, diff stat vs base).
    With `branch`: HEAD is put back on the worker's own branch first (a sandboxed agent may have
    pointed it at another branch) and the index is rebuilt from HEAD (the agent's index may name
    objects only its private object store holds), so the commit lands on its branch alone."""
    if branch is not None:
        run_git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=worktree)
        run_git("read-tree", "HEAD", cwd=worktree)
    run_git(*ADD_ALL, cwd=worktree, ok=ADD_ALL_OK)
    if run_git("status", "--porcelain", cwd=worktree):
        run_git("commit", "-q", "--no-verify", "-m", message, cwd=worktree)
    head = run_git("rev-parse", "--verify", "HEAD^{commit}", cwd=worktree)
    stat = run_git("diff", "--shortstat", f"{base_commit}..HEAD", "--", cwd=worktree) if base_commit else ""
    return head, stat


def read_agent_file(path: Path, limit: int) -> str | None:
    """The first `limit` bytes of a file an agent could have written, if it is a regular file
    (not a link, fifo or device), as text; None otherwise. Never blocks, never follows a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode("utf-8", errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)
