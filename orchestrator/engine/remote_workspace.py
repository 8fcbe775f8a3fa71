"""A repository worker's worktree where its executor runs it: on the server's disk (a linked
worktree of the job's repository) or on a remote node (workspaces/remote.py).

A remote node does not share the server's disk, so the server makes no worktree for it: it
makes the worker's branch at the base and publishes the base to the git remote the nodes reach;
the node clones it, and pushes the branch back when the worker ends. At the engine's final
commit the server fetches that branch (checked to descend from its start) into the repository,
so the branch, commit and diff stat in the API and the result integration are as on one machine.
The engine calls these in a thread (the start and the fetch under its per-repository lock).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.core.config import Settings
from orchestrator.executors.local import LocalExecutor
from orchestrator.workspaces import git, gitdirs, remote
from orchestrator.workspaces.remote import RemoteCheckout, RemoteError

if TYPE_CHECKING:
    from orchestrator.executors.ray_executor import RayExecutor

RAY_EXECUTOR_MODULE = "orchestrator.executors.ray_executor"


def on_ray(executor: LocalExecutor) -> RayExecutor | None:
    """The executor if it runs workers on a Ray cluster, else None. Asked without importing the
    Ray executor's module: it imports Ray, whose import is most of an engine's start-up CPU, and
    an engine on the local executor never needs it (a RayExecutor exists only once
    executors/factory.py imported its module)."""
    module = sys.modules.get(RAY_EXECUTOR_MODULE)
    ray_executor: type[RayExecutor] | None = getattr(module, "RayExecutor", None)
    return executor if ray_executor is not None and isinstance(executor, ray_executor) else None


def is_remote(executor: LocalExecutor) -> bool:
    """Whether the executor runs workers on nodes that do not share the server's disk."""
    return on_ray(executor) is not None


def lost_reason(executor: LocalExecutor, host: str | None) -> str | None:
    """Why a worker found gone at a take-over is gone, if its cluster node is known dead."""
    cluster = on_ray(executor)
    return cluster.lost_reason(host) if cluster is not None else None


def end_unrecorded(executor: LocalExecutor, worker_id: str) -> None:
    """A worker that ended (a cancel) while its start was under way and its engine died: on a
    cluster its actor may have started it after all, for nobody (a local start leaves its PID
    file, which finds it instead)."""
    cluster = on_ray(executor)
    if cluster is not None:
        cluster.end_unrecorded(worker_id)


def add_worktree(
    executor: LocalExecutor, settings: Settings, repository: Path, workdir: Path, branch: str, base: str
) -> None:
    """The worker's worktree at `base` on `branch`: a local one, or (remote executor) the branch
    made here, the base published, and the checkout handed to the executor for the node."""
    cluster = on_ray(executor)
    if cluster is None:
        git.add_worktree(repository, workdir, branch, base)
        return
    url = _remote(settings, repository)
    checkout = remote.start_checkout(repository, url, branch, base)
    cluster.expect_checkout(workdir.name, checkout)


def resume_worktree(
    executor: LocalExecutor, settings: Settings, repository: str | None, workdir: Path, branch: str | None
) -> None:
    """A parked worker resumed in place (remote executor): its node clones the branch as it came
    back at its last end (published as the start), the work so far included. Local: nothing."""
    cluster = on_ray(executor)
    if cluster is None or not repository or not branch or (workdir / ".git").exists():
        return
    url = _remote(settings, repository)
    tip = git.run_git(
        "rev-parse", "--verify", "--end-of-options", f"refs/heads/{branch}^{{commit}}", cwd=Path(repository)
    )
    remote.publish_base(Path(repository), url, tip)
    cluster.expect_checkout(workdir.name, RemoteCheckout(url, tip, branch))


def checkpoint(
    executor: LocalExecutor, settings: Settings, repository: Path, worker_id: str, branch: str
) -> None:
    """A delegating worker on a remote node: its live worktree committed there and pushed onto
    its branch, fetched into the repository (checked to descend from the branch as it is here),
    so its child starts from its work so far, as on one machine. Local: nothing (the engine
    commits the worktree itself)."""
    cluster = on_ray(executor)
    if cluster is None:
        return
    url = _remote(settings, repository)
    cluster.checkpoint(worker_id)
    if remote.fetch_branch(repository, url, branch) is None:
        raise RemoteError(f"branch {branch} did not reach git remote {remote.redact(url)} at the checkpoint")


def _remote(settings: Settings, repository: str | Path) -> str:
    url = remote.git_remote_for(settings, repository)
    if url is None:
        raise RemoteError(
            f"repository {repository}: workers on remote nodes need a git remote the nodes can reach "
            "(ORCHESTRATOR_GIT_REMOTE, or git_remote in the repository's table of the agents file)"
        )
    return url


def commit_work(
    executor: LocalExecutor,
    settings: Settings,
    repository: str | None,
    worktree: Path,
    run_dir: Path,
    message: str,
    base_commit: str | None,
    branch: str,
    skipped: list[str] | None = None,
    max_file_mb: int | None = None,
) -> tuple[str, str]:
    """(commit, diff stat vs base) of the worker's work: its local worktree committed (files above
    `max_file_mb` left out, into `skipped`), or the branch its node pushed fetched into the
    repository. Raises GitError (RemoteError) if the work did not come back."""
    cluster = on_ray(executor)
    if cluster is None or (worktree / ".git").exists() or not repository:
        return gitdirs.commit_worker(worktree, run_dir, message, base_commit, branch, skipped, max_file_mb)
    pushed_error = cluster.push_error(worktree.name)
    left_out = cluster.skipped_files(worktree.name)  # its node left them out, as above
    url = _remote(settings, repository)
    commit = remote.fetch_branch(Path(repository), url, branch, base_commit=base_commit)
    if pushed_error:
        # Its final push failed: what the branch holds, if anything, is an earlier checkpoint's
        # commit (a delegation's), not the worker's work; reporting it as the commit would hide that.
        held = f"; branch {branch} holds only its checkpoint {commit}" if commit else ""
        raise RemoteError(pushed_error + held)
    if commit is None:
        raise RemoteError(
            f"branch {branch} did not come back from its node (not in git remote {remote.redact(url)})"
        )
    if skipped is not None:
        skipped += left_out
    stat = remote.diff_stat(Path(repository), base_commit, commit) if base_commit else ""
    return commit, stat
