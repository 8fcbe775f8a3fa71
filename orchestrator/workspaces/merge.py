"""Git work of integration: a job's result branch built from the job's base commit by real merges
of its sources (children's result branches, then worker branches).

A merge without conflicts is made in memory (`merge_in_memory`: no checkout); a conflicting one
is redone in a temporary detached worktree, with the merge left in progress for a resolver.
Everything here is redone from scratch after a crash: no branch is checked out in the temporary
worktree, and the result branch is written only by `publish`, so a merge cut short leaves nothing
but unreferenced objects and at most a directory and a worktree entry that `prepare` removes."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.workspaces.git import GIT_UMASK, SAFE_CONFIG, GitError, git_env, read_agent_file

# The one git runner's settings (no hooks: a worker, hostile code, can write into the repository's
# hooks directory; no GIT_* from the environment; worktrees a sandboxed agent's uid owns), plus
# the plain conflict style the resolvers and marker checks expect.
_SAFE = (*SAFE_CONFIG, "-c", "merge.conflictStyle=merge")
CONFLICT_MARKERS = ("<<<<<<< ", ">>>>>>> ")


def result_branch(job_id: str) -> str:
    """`orchestrator/<job>/result`: git cannot hold both `orchestrator/<job>` and the worker
    branches `orchestrator/<job>/<worker>` (a ref cannot be a file and a directory), so the result
    sits next to them, under the job's own prefix."""
    return f"orchestrator/{job_id}/result"


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**git_env(), "GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true"}
    done = subprocess.run(
        ["git", *_SAFE, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
        check=False,
        umask=GIT_UMASK,
    )
    if check and done.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def out(*args: str, cwd: Path) -> str:
    return run(*args, cwd=cwd).stdout.strip()


def ref_commit(repository: Path, ref: str) -> str | None:
    done = run("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", cwd=repository, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def prepare(repository: Path, temp: Path, start: str) -> None:
    """A clean detached worktree at `start` in `temp`, whatever a previous attempt left."""
    discard(repository, temp)
    temp.parent.mkdir(parents=True, exist_ok=True)
    run("worktree", "add", "--detach", "--force", str(temp), start, cwd=repository)


def discard(repository: Path, temp: Path) -> None:
    """Remove the temporary worktree (and git's record of it), if any."""
    if temp.exists():
        run("worktree", "remove", "--force", "--force", str(temp), cwd=repository, check=False)
        shutil.rmtree(temp, ignore_errors=True)
    run("worktree", "prune", cwd=repository, check=False)


@dataclass
class Merged:
    branch: str
    commit: str  # the source's commit
    merge_commit: str | None  # None: already in the result (a no-op)


@dataclass
class Conflicted:
    branch: str
    commit: str
    before: str  # HEAD before the merge began
    files: list[str] = field(default_factory=list)


def merge_in_memory(repository: Path, current: str, branch: str, message: str) -> Merged | None:
    """Merge `branch` into commit `current` without a worktree (`git merge-tree`, the same `ort`
    merge as `git merge`, then `commit-tree` with both parents): the common, conflict-free case
    costs no checkout. None when it conflicts (then `merge` redoes it in a worktree)."""
    commit = out("rev-parse", "--verify", f"{branch}^{{commit}}", cwd=repository)
    if run("merge-base", "--is-ancestor", commit, current, cwd=repository, check=False).returncode == 0:
        return Merged(branch, commit, None)
    done = run("merge-tree", "--write-tree", "--no-messages", current, commit, cwd=repository, check=False)
    if done.returncode == 1:
        return None
    if done.returncode != 0:
        raise GitError(f"git merge-tree {branch} failed: {done.stderr.strip() or done.stdout.strip()}")
    tree = done.stdout.split()[0]
    made = out("commit-tree", tree, "-p", current, "-p", commit, "-m", message, cwd=repository)
    return Merged(branch, commit, made)


def merge(temp: Path, branch: str, into: str) -> Merged | Conflicted:
    """Merge `branch` into the worktree's HEAD with a merge commit; a conflict is left in progress."""
    commit = out("rev-parse", "--verify", f"{branch}^{{commit}}", cwd=temp)
    before = head(temp)
    if run("merge-base", "--is-ancestor", commit, "HEAD", cwd=temp, check=False).returncode == 0:
        return Merged(branch, commit, None)
    done = run(
        "merge", "--no-ff", "--no-verify", "--no-edit", "-m", f"orchestrator: merge {branch} into {into}",
        commit, cwd=temp, check=False,
    )  # fmt: skip
    if done.returncode == 0:
        return Merged(branch, commit, out("rev-parse", "HEAD", cwd=temp))
    files = unmerged(temp)
    if not files:
        raise GitError(f"git merge {branch} failed: {done.stderr.strip() or done.stdout.strip()}")
    return Conflicted(branch, commit, before, files)


def unmerged(temp: Path) -> list[str]:
    return sorted(set(out("diff", "--name-only", "--diff-filter=U", cwd=temp).splitlines()))


def with_markers(temp: Path, files: list[str]) -> list[str]:
    """Files that still hold conflict markers at the start of a line."""
    found = []
    for name in files:
        path = temp / name
        try:
            text = path.read_text(errors="replace")
        except (FileNotFoundError, IsADirectoryError):
            continue
        if any(line.startswith(CONFLICT_MARKERS) or line == "=======" for line in text.splitlines()):
            found.append(name)
    return found


def conclude(temp: Path, conflict: Conflicted) -> str | None:
    """Commit a merge whose conflicts someone (a resolver: hostile code) resolved in the worktree;
    returns the commit, or None when it is not resolved: files still unmerged or holding markers,
    or the merge no longer in progress. A resolver that committed the merge itself is accepted
    only if its commit is exactly that merge (parents: HEAD before, the source)."""
    in_progress = run("rev-parse", "-q", "--verify", "MERGE_HEAD", cwd=temp, check=False).returncode == 0
    if not in_progress:
        # A commit of its own that is not exactly the merge, or that only its private object
        # store holds (in the sandbox), is refused before anything else reads it.
        parents = run("rev-parse", "HEAD^1", "HEAD^2", cwd=temp, check=False).stdout.split()
        if parents != [conflict.before, conflict.commit]:
            return None
        if out("status", "--porcelain", cwd=temp) or with_markers(temp, conflict.files):
            return None
        return head(temp)
    # The resolver's own `git add` (in the sandbox) wrote its blobs to a private object store
    # the repository never sees: drop its index entries for the conflicted files, so staging
    # hashes them again, here. Anything else it staged makes the commit fail: the job fails.
    run("rm", "--cached", "-q", "--ignore-unmatch", "--", *conflict.files, cwd=temp)
    run("add", "-A", cwd=temp)
    if unmerged(temp) or with_markers(temp, conflict.files):
        return None
    run("commit", "--no-verify", "--no-edit", cwd=temp)
    return head(temp)


def head(temp: Path) -> str:
    return out("rev-parse", "HEAD", cwd=temp)


def publish(repository: Path, branch: str, commit: str) -> None:
    """Point the result branch at `commit` (created or moved: a redo writes the same tree)."""
    lock = Path(out("rev-parse", "--git-common-dir", cwd=repository))
    if not lock.is_absolute():
        lock = repository / lock
    # A lock left by an update killed with its engine: only the holder of the repository's
    # integration lock writes this ref, so a lock file here is stale.
    (lock / "refs" / "heads" / f"{branch}.lock").unlink(missing_ok=True)
    run("update-ref", "-m", "orchestrator: result", f"refs/heads/{branch}", commit, cwd=repository)


@dataclass
class Summary:
    diff_stat: str
    files_changed: int
    insertions: int
    deletions: int


def summarize(repository: Path, base: str, commit: str) -> Summary:
    stat = out("diff", "--stat", f"{base}..{commit}", cwd=repository)
    files = insertions = deletions = 0
    for line in out("diff", "--numstat", f"{base}..{commit}", cwd=repository).splitlines():
        added, removed, _ = line.split("\t", 2)
        files += 1
        insertions += int(added) if added.isdigit() else 0
        deletions += int(removed) if removed.isdigit() else 0
    return Summary(stat, files, insertions, deletions)


def diff(repository: Path, base: str, commit: str, path: str | None, limit: int) -> tuple[str, bool]:
    """The unified diff of the result against its base (one path, or all), cut at `limit` bytes."""
    args = [
        "--literal-pathspecs",
        "diff",
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        f"{base}..{commit}",
    ]
    if path is not None:
        args += ["--", path]
    text = run(*args, cwd=repository).stdout
    if len(text.encode()) <= limit:
        return text, False
    return text.encode()[:limit].decode(errors="ignore"), True


@dataclass
class IntoWorktree:
    status: str  # merged | already merged | conflict
    merge_commit: str | None
    files: list[str]
    diff_stat: str


def merge_into_worktree(
    repository: Path, workdir: Path, branch: str, commit: str, message: str
) -> IntoWorktree:
    """Merge `commit` into a worker's own worktree (on its branch). The worktree is the agent's:
    its `.git` file is not trusted to say which repository it is; git is pointed at the
    repository's own record of that worktree, which must name `workdir` and be on `branch`. That
    record's directory is writable by the agent too (HEAD, index): git runs on a private copy of
    it whose `commondir` the server writes, so a rewritten `commondir` or a planted link cannot
    aim git's writes elsewhere; the index and a conflict's merge state are put back after."""
    common = Path(out("rev-parse", "--git-common-dir", cwd=repository))
    if not common.is_absolute():
        common = (repository / common).resolve()
    admin = common / "worktrees" / workdir.name
    # The agent's to write (a link, a fifo swapped in after a check): read without following or blocking.
    recorded = (read_agent_file(admin / "gitdir", 4096) or "").strip()
    if Path(recorded).resolve() != (workdir / ".git").resolve():
        raise GitError(f"{workdir} is not a worktree of {repository}")
    with tempfile.TemporaryDirectory(prefix="merge-admin-") as private:
        copy = Path(private)
        _copy_file(admin / "HEAD", copy / "HEAD")
        (copy / "commondir").write_text(f"{common}\n")
        (copy / "gitdir").write_text(f"{workdir / '.git'}\n")
        done = _merge_in(copy, workdir, branch, commit, message)
        for name in ("index", *(MERGE_STATE if done.status == "conflict" else ())):
            _copy_file(copy / name, admin / name)
    return done


MERGE_STATE = ("MERGE_HEAD", "MERGE_MSG", "MERGE_MODE", "AUTO_MERGE", "ORIG_HEAD")


def _merge_in(admin: Path, workdir: Path, branch: str, commit: str, message: str) -> IntoWorktree:
    base = ("--git-dir", str(admin), "--work-tree", str(workdir))
    if out(*base, "symbolic-ref", "-q", "HEAD", cwd=workdir) != f"refs/heads/{branch}":
        raise GitError(f"the worktree is not on its branch {branch}")
    # The index from the branch, not the agent's (the engine's checkpoints commit with an index
    # of their own): what differs in the worktree is the agent's uncommitted work.
    out(*base, "read-tree", "HEAD", cwd=workdir)
    if run(*base, "merge-base", "--is-ancestor", commit, "HEAD", cwd=workdir, check=False).returncode == 0:
        return IntoWorktree("already merged", None, [], "")
    before = out(*base, "rev-parse", "HEAD", cwd=workdir)
    merging = ("merge", "--no-ff", "--no-verify", "--no-edit", "-m", message, commit)
    done = run(*base, *merging, cwd=workdir, check=False)
    if done.returncode == 0:
        after = out(*base, "rev-parse", "HEAD", cwd=workdir)
        stat = out(*base, "diff", "--stat", f"{before}..{after}", cwd=workdir)
        names = out(*base, "diff", "--name-only", f"{before}..{after}", cwd=workdir).splitlines()
        return IntoWorktree("merged", after, names, stat)
    files = sorted(set(out(*base, "diff", "--name-only", "--diff-filter=U", cwd=workdir).splitlines()))
    if not files:
        raise GitError(f"git merge failed: {done.stderr.strip() or done.stdout.strip()}")
    return IntoWorktree("conflict", None, files, "")


def _copy_file(source: Path, target: Path) -> None:
    """Copy a regular file without following a link at either end (the agent may have planted
    one on either side): read with O_NOFOLLOW, written beside the target and renamed over it."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise GitError(f"cannot read {source.name} of the worktree's git dir: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    partial = target.with_name(f".{target.name}.orchestrator-tmp")
    partial.unlink(missing_ok=True)
    # Created, never opened: the agent runs while it merges and may plant a link at this name
    # again between the unlink and the open (a plain open would follow it and write as root).
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    except FileExistsError as exc:
        raise GitError(f"{partial.name} in the worktree's git dir was made again while merging") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, target)
