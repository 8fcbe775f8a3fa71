"""Worktree set-up per repository, configured on the server only (never from a request).

In the server's TOML file (ORCHESTRATOR_AGENTS_FILE, next to the agent profiles):

    [repositories."/home/me/project"]
    copy = [".env", "config/local.json"]    # from the main checkout into each new worktree
    setup = "npm ci"                        # or a list: ["npm", "ci"]; run before the agent
    setup_timeout_seconds = 600
    git_remote = "ssh://git@gitserver/project.git"  # workers on remote nodes (workspaces/remote.py)

Files are copied by the engine when it creates the worktree (a missing one fails the start with
its name). The set-up command runs in the worker's own process, so inside its sandbox, in the
worktree, before the agent: `python -m orchestrator.workspaces.setup` runs it with its output in
the worker's log, then becomes the agent (exec). If it fails, the worker FAILS with the reason
written to its run directory (`setup-failed`), which the engine reads when the worker ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from orchestrator.agents.base import LaunchSpec
from orchestrator.workspaces.git import read_agent_file

FAILURE_FILE = ".orchestrator-setup-failed"


def _failure_path(run_dir: Path) -> Path:
    """In the worker's HOME (`<run_dir>/home`): the one place of the run dir a sandboxed worker
    may write. The worker could forge it, but only to word its own failure."""
    return run_dir / "home" / FAILURE_FILE


@dataclass(frozen=True)
class RepositorySetup:
    copy: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()  # argv; a string is run with `sh -c`
    timeout_seconds: float = 600.0
    label: str = ""
    git_remote: str | None = None  # checked where it is used (workspaces/remote.py)


@dataclass
class _Cache:
    mtime: float | None = None
    setups: dict[Path, RepositorySetup] = field(default_factory=dict)


_cache: dict[Path, _Cache] = {}


def load(path: Path) -> dict[Path, RepositorySetup]:
    """The `[repositories]` of the server's TOML file, keyed by resolved repository path."""
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    found: dict[Path, RepositorySetup] = {}
    for key, spec in (data.get("repositories") or {}).items():
        if not isinstance(spec, dict):
            raise ValueError(f"repositories.{key!r} must be a table")
        copy = spec.get("copy", [])
        if not isinstance(copy, list) or not all(isinstance(c, str) for c in copy):
            raise ValueError(f"repositories.{key!r}: copy must be a list of paths")
        for name in copy:
            parts = PurePosixPath(name).parts
            if not name or PurePosixPath(name).is_absolute() or ".." in parts or parts[:1] == (".git",):
                raise ValueError(f"repositories.{key!r}: copy path {name!r} must be relative, without '..'")
        raw = spec.get("setup")
        if raw is None:
            command: tuple[str, ...] = ()
            label = ""
        elif isinstance(raw, str):
            command, label = ("sh", "-c", raw), raw
        elif isinstance(raw, list) and raw and all(isinstance(c, str) for c in raw):
            command, label = tuple(raw), " ".join(raw)
        else:
            raise ValueError(f"repositories.{key!r}: setup must be a command string or a list of strings")
        timeout = float(spec.get("setup_timeout_seconds", 600))
        remote = spec.get("git_remote")
        if remote is not None and (not isinstance(remote, str) or not remote):
            raise ValueError(
                f"repositories.{key!r}: git_remote must be a non-empty string (a git URL or path)"
            )
        found[Path(key).expanduser().resolve()] = RepositorySetup(
            tuple(copy), command, timeout, label, remote
        )
    return found


def for_repository(agents_file: Path | None, repository: str | None) -> RepositorySetup | None:
    """The set-up of `repository`, re-read when the file changes."""
    if agents_file is None or repository is None:
        return None
    try:
        mtime = agents_file.stat().st_mtime
    except OSError:
        return None
    cached = _cache.setdefault(agents_file, _Cache())
    if cached.mtime != mtime:
        cached.setups, cached.mtime = load(agents_file), mtime
    return cached.setups.get(Path(repository).resolve())


def prepare(
    agents_file: Path | None, repository: str | None, workdir: Path, run_dir: Path, spec: LaunchSpec
) -> LaunchSpec:
    """Copy the configured files into the new worktree, and wrap the agent's command so the
    set-up command runs first (in the worker's process). Blocking: the launcher thread runs it."""
    config = for_repository(agents_file, repository)
    _failure_path(run_dir).unlink(missing_ok=True)
    if config is None or repository is None:
        return spec
    copied = []
    for name in config.copy:
        source, target = Path(repository) / name, workdir / name
        if not source.exists():
            raise FileNotFoundError(f"worktree set-up: {name} (to copy) does not exist in {repository}")
        _refuse_links(workdir, source, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target, follow_symlinks=False)
        copied.append(name)
    if not config.setup and not copied:
        return spec
    plan = {
        "copied": copied,
        "setup": list(config.setup),
        "label": config.label,
        "timeout": config.timeout_seconds,
        "failure_file": str(_failure_path(run_dir)),
    }
    argv = [sys.executable, "-m", "orchestrator.workspaces.setup", json.dumps(plan), "--", *spec.argv]
    return LaunchSpec(argv=argv, env=spec.env, stdin_text=spec.stdin_text)


def _refuse_links(workdir: Path, source: Path, name: str) -> None:
    """Refuse a copy that would go through a symbolic link in the new worktree. It is checked out
    from the branch it starts from, which an agent wrote (a child job starts from its parent's
    branch): a committed `.env -> /etc/passwd`, or a directory link, would have the engine write
    the repository's file over a host file, as the server's user. No agent runs in the worktree
    yet, so nothing can change between this check and the copy."""
    names = [PurePosixPath(name)]
    if source.is_dir():
        names += [
            PurePosixPath(name) / Path(top, entry).relative_to(source)
            for top, dirs, files in os.walk(source)
            for entry in (*dirs, *files)
        ]
    for relative in names:
        current = workdir
        for part in relative.parts:
            current = current / part
            if current.is_symlink():
                raise FileExistsError(
                    f"worktree set-up: {name} is not copied: {current.relative_to(workdir)} is a "
                    "symbolic link in the worktree (committed on the branch it starts from)"
                )


def failure(run_dir: Path) -> str | None:
    """Why the worker's set-up failed, if it did (read by the engine when the worker ends). The
    file is in the agent's HOME, so it may be anything the agent made it: only a regular file is
    read (a link to a host file would put that file into the worker's status reason, readable
    through the API; a fifo would block the engine; /dev/zero would never end), and only its
    first MAX_FAILURE_BYTES."""
    text = read_agent_file(_failure_path(run_dir), MAX_FAILURE_BYTES)
    return (text or "").strip() or None


MAX_FAILURE_BYTES = 4096


def main(argv: list[str]) -> int:
    """In the worker's process: run the set-up (output to the worker's log), then exec the agent."""
    plan = json.loads(argv[0])
    agent = argv[2:] if len(argv) > 1 and argv[1] == "--" else argv[1:]
    for name in plan["copied"]:
        print(f"[setup] copied {name} into the worktree", flush=True)
    if plan["setup"]:
        print(f"[setup] running: {plan['label']}", flush=True)
        reason = None
        try:
            done = subprocess.run(
                plan["setup"], stdin=subprocess.DEVNULL, timeout=plan["timeout"], check=False
            )
            if done.returncode != 0:
                reason = f"worktree set-up failed: `{plan['label']}` exited with code {done.returncode}"
        except subprocess.TimeoutExpired:
            reason = f"worktree set-up failed: `{plan['label']}` ran longer than {plan['timeout']:g}s"
        except OSError as exc:
            reason = f"worktree set-up failed: `{plan['label']}` could not run: {exc.strerror or exc}"
        if reason is not None:
            Path(plan["failure_file"]).write_text(reason)
            print(f"[setup] {reason}", flush=True)
            return 1
        print("[setup] done", flush=True)
    os.execvp(agent[0], agent)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
