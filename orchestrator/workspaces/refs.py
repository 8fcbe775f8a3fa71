"""`base_ref`: its format, what it resolves to, and which refs a worker token may start from.

A job's workers start from `base_ref` in the job's repository. Every worker's branch,
`orchestrator/<job>/<worker>`, lives in that one repository, so without a check a worker could
start a child from another tree's branch and read that tree's work. A worker token may name only
branches of its own subtree's jobs, or refs that are not orchestrator branches (`main`, tags, a
commit id). The name is checked as written (however spelled: `heads/...`, `refs/heads/...`) before
git is asked, and again once git has resolved it (a symbolic ref the agent made could point
anywhere). The engine repeats the check at the start, on the name as resolved then, and starts
the worktree from the commit it resolved, so a ref changed after the submit gains nothing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.errors import BadRequest, Forbidden
from orchestrator.workspaces.git import GitError, run_git

BRANCH_PREFIX = "orchestrator/"
_FULL_BRANCH_PREFIX = "refs/heads/"
_COMMIT_ID = re.compile(r"^[0-9a-fA-F]{4,64}$")
# git check-ref-format: no control characters, space, ~ ^ : ? * [ \ anywhere.
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")

# The job path of a job id, or None if there is no such job.
PathOf = Callable[[str], Awaitable[str | None]]


def ref_format_error(ref: str) -> str | None:
    """Why `ref` is not acceptable as a base_ref (None if it is): the rules of
    `git check-ref-format --allow-onelevel`, or a commit id; printable text only, and no
    leading `-` (which git would read as an option)."""
    if not ref:
        return "must not be empty"
    if not ref.isprintable():
        return "must contain printable characters only (no control characters or line separators)"
    if ref.startswith("-"):
        return "must not start with '-'"
    if _COMMIT_ID.match(ref):
        return None
    if _FORBIDDEN_CHARS.search(ref):
        return "must not contain spaces or any of ~ ^ : ? * [ \\"
    if ".." in ref or "@{" in ref or ref == "@":
        return "must not contain '..' or '@{', nor be '@'"
    if ref.startswith("/") or ref.endswith("/") or "//" in ref:
        return "must not start or end with '/' nor contain '//'"
    if ref.endswith("."):
        return "must not end with '.'"
    for part in ref.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return "no '/'-separated part may start with '.' or end with '.lock'"
    return None


def branch_job(ref: str) -> str | None:
    """The job id an orchestrator branch name carries, however spelled (`orchestrator/j/w`,
    `heads/...`, `refs/heads/...`); None for a ref that is not an orchestrator branch."""
    name = ref
    for prefix in (_FULL_BRANCH_PREFIX, "heads/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if not name.startswith(BRANCH_PREFIX):
        return None
    return name[len(BRANCH_PREFIX) :].split("/", 1)[0]


@dataclass(frozen=True)
class Resolved:
    full_name: str  # e.g. refs/heads/main; "" when the ref is a commit id
    commit: str


def resolve(repository: Path, ref: str) -> Resolved:
    """What `ref` names in `repository`: its full name (symbolic refs followed) and its commit.
    Blocking (runs git). Raises BadRequest if it does not resolve to one commit."""
    try:
        full_name = run_git(
            "rev-parse", "--verify", "--symbolic-full-name", "--end-of-options", ref, cwd=repository
        )
        target = full_name or ref
        commit = run_git("rev-parse", "--verify", "--end-of-options", f"{target}^{{commit}}", cwd=repository)
    except GitError as exc:
        raise BadRequest(
            f"base_ref {ref!r} does not resolve to a commit in repository {repository} "
            "(unknown, ambiguous, or not a commit)"
        ) from exc
    return Resolved(full_name=full_name, commit=commit)


async def check_branch_owner(ref: str, subtree: str, path_of: PathOf) -> None:
    """403 unless `ref` is not an orchestrator branch or is one of a job in `subtree`."""
    job_id = branch_job(ref)
    if job_id is None:
        return
    path = await path_of(job_id) if job_id else None
    if path is None or not path.startswith(subtree):
        raise Forbidden(
            f"base_ref {ref!r} names an orchestrator branch outside this token's job subtree; "
            "a worker may start sub-jobs from its own subtree's branches, main, tags or commits"
        )


async def resolve_checked(
    repository: Path,
    ref: str,
    *,
    subtree: str | None,
    path_of: PathOf,
) -> Resolved:
    """Resolve `ref`; for a worker (`subtree` set) check the name before git sees it and again as
    resolved."""
    if subtree is not None:
        await check_branch_owner(ref, subtree, path_of)
    resolved = await asyncio.to_thread(resolve, repository, ref)
    if subtree is not None and resolved.full_name:
        await check_branch_owner(resolved.full_name, subtree, path_of)
    return resolved


def is_branch(resolved: Resolved, branch: str) -> bool:
    return resolved.full_name == _FULL_BRANCH_PREFIX + branch
