"""Workspaces on a node that does not share the server's disk: a git remote carries the work.

The server publishes the worker's base commit to a bare repository the nodes can reach (the
remote: ORCHESTRATOR_GIT_REMOTE, or `git_remote` in the repository's `[repositories."<path>"]`
table of the server's TOML file). The node makes a repository of its own beside the worktree
(`node_repository`), fetches the base from the remote and adds the worktree as a linked worktree
of it on the worker's branch: the same layout as on the server, so the sandbox gives the agent the
same private git view. When the worker ends (also when terminated) the node commits what the
worktree holds onto the branch and pushes that branch, and only it, back; the server fetches it
into the job's repository, where the API, the diff stat and the result integration find it as if
the worker had run on one machine.

The worktree is the agent's: its `.git` file, the worktree's own git dir (HEAD, index) and every
file may have been rewritten. The final commit therefore never reads them: git is pointed at the
node repository explicitly (`--git-dir`, no discovery through the worktree's `.git`), with its
config rewritten and its index rebuilt from the branch, and the push names its URL and an explicit
`<commit>:refs/heads/<branch>` refspec on the command line. Hooks and fsmonitor are off for every
call (SAFE_CONFIG), and only the transports below may be used (no `ext::` command transport). The
server accepts a branch only if it descends from where the branch started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.config import Settings
from orchestrator.workspaces import refs
from orchestrator.workspaces import setup as worktree_setup
from orchestrator.workspaces.git import GitError, run_git

# Transports a remote may use; git refuses any other (`ext::` would run a command).
_TRANSPORTS = ("file", "ssh", "git", "http", "https")
_PROTOCOLS = (
    "-c",
    "protocol.allow=never",
    *(arg for name in _TRANSPORTS for arg in ("-c", f"protocol.{name}.allow=always")),
)
# Pushes and fetches send or take exactly the refs named, nothing a config file adds.
_PUSH = ("push", "--no-verify", "--recurse-submodules=no", "--no-follow-tags", "--no-signed")
_FETCH = ("fetch", "--no-tags", "--no-recurse-submodules", "--no-write-fetch-head", "--quiet")
_URL_SCHEMES = ("file", "ssh", "git", "http", "https", "git+ssh", "ssh+git")
_COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_SCP_LIKE = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+:")
_CREDENTIALS = re.compile(r"(://)[^/@]*@")
# Clones and pushes of a large repository take long; a stuck transport still ends.
NETWORK_TIMEOUT = 1800.0
BASE_REF_PREFIX = "refs/orchestrator/base/"
_INCOMING_PREFIX = "refs/orchestrator/incoming/"


class RemoteError(GitError):
    """A remote workspace operation that cannot be done; the message says why (one line, no
    credentials). A GitError, so callers that record a failed commit already handle it."""


@dataclass(frozen=True)
class RemoteCheckout:
    """What a node needs to make a worker's worktree: where to clone from, what, on which branch."""

    remote_url: str
    base_commit: str
    branch: str


# ---------------------------------------------------------------------------------------------
# Settings and checks


def git_remote_for(settings: Settings, repository: str | Path) -> str | None:
    """The remote the nodes use for `repository`: its own `git_remote`, else
    ORCHESTRATOR_GIT_REMOTE, else None (workers of this repository cannot run on a remote node).
    Raises RemoteError if the configured value is not a usable remote."""
    config = worktree_setup.for_repository(settings.orchestrator_agents_file, str(repository))
    url = (config.git_remote if config else None) or settings.orchestrator_git_remote
    if url:
        check_remote_url(url)
    return url or None


def check_remote_url(url: str) -> None:
    """Refuse what is not a plain remote: an absolute path, `[user@]host:path`, or a URL of one
    of the usual transports. Relative paths would name different places on server and node."""
    shown = redact(url)
    if not url or not url.isprintable() or url != url.strip():
        raise RemoteError(
            f"git remote {shown!r}: must be non-empty printable text without surrounding spaces"
        )
    if url.startswith("-"):
        raise RemoteError(f"git remote {shown!r}: must not start with '-'")
    if "::" in url.split("/", 1)[0]:
        raise RemoteError(f"git remote {shown!r}: remote helper transports (<name>::...) are not allowed")
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in _URL_SCHEMES:
            raise RemoteError(
                f"git remote {shown!r}: scheme {scheme!r} is not one of {', '.join(_URL_SCHEMES)}"
            )
        return
    if url.startswith("/") or _SCP_LIKE.match(url):
        return
    raise RemoteError(f"git remote {shown!r}: must be an absolute path, [user@]host:path or a URL")


def redact(url: str) -> str:
    """The URL without a password or token in it (error messages end up in the API)."""
    return _CREDENTIALS.sub(r"\1***@", url)


def _check(checkout: RemoteCheckout) -> None:
    check_remote_url(checkout.remote_url)
    _check_commit(checkout.base_commit)
    _check_branch(checkout.branch)


def _check_commit(commit: str) -> None:
    if not isinstance(commit, str) or not _COMMIT.match(commit):
        raise RemoteError(f"base commit {commit!r}: must be a full commit id (lower-case hex)")


def _check_branch(branch: str) -> None:
    problem = refs.ref_format_error(branch)
    if problem is None and (not branch.startswith(refs.BRANCH_PREFIX) or refs.branch_job(branch) is None):
        problem = f"must be an orchestrator branch ({refs.BRANCH_PREFIX}<job>/<worker>)"
    if problem is not None:
        raise RemoteError(f"branch {branch!r}: {problem}")


def _remote_git(*args: str, url: str, cwd: Path, what: str) -> str:
    """A git call that talks to the remote; its failure as one line naming the remote."""
    try:
        return run_git(*_PROTOCOLS, *args, cwd=cwd, timeout=NETWORK_TIMEOUT)
    except GitError as exc:
        raise RemoteError(f"{what} (git remote {redact(url)}): {_reason(str(exc), url)}") from None


def _reason(message: str, url: str) -> str:
    """The useful line of git's error: the first `fatal:`/`error:` line, credentials removed."""
    lines = [line.strip() for line in message.replace(url, redact(url)).splitlines() if line.strip()]
    for line in lines:
        for marker in ("fatal: ", "error: ", "! ["):
            if marker in line:
                return line[line.index(marker) :][:300]
    return (lines[-1] if lines else "git failed")[:300]


# ---------------------------------------------------------------------------------------------
# Server side


def publish_base(repository: Path, remote_url: str, base_commit: str) -> None:
    """Make `base_commit` fetchable from the remote, as `refs/orchestrator/base/<sha>` (a node
    fetches refs, not bare commit ids, which many servers refuse)."""
    check_remote_url(remote_url)
    _check_commit(base_commit)
    ref, what = f"{BASE_REF_PREFIX}{base_commit}", f"cannot publish base commit {base_commit}"
    try:
        _remote_git(
            *_PUSH, "--end-of-options", remote_url, f"+{base_commit}:{ref}",
            url=remote_url, cwd=repository, what=what,
        )  # fmt: skip
    except RemoteError:
        # Another engine publishing the same base at the same time holds the ref's lock.
        try:
            published = _remote_tip(repository, remote_url, ref, what)
        except RemoteError:
            published = None
        if published != base_commit:
            raise


def _remote_tip(repository: Path, url: str, ref: str, what: str) -> str | None:
    """The commit `ref` names in the remote, None if it has no such ref."""
    listed = _remote_git("ls-remote", "--end-of-options", url, ref, url=url, cwd=repository, what=what)
    for line in listed.splitlines():
        sha, _, name = line.partition("\t")
        if name == ref:
            return sha
    return None


def start_checkout(repository: Path, remote_url: str, branch: str, base_commit: str) -> RemoteCheckout:
    """The server's part of starting a remote worker (in place of `git.add_worktree`): the
    branch made in the repository at the base, as on one machine (the API shows it from the
    start, and `fetch_branch` accepts only what descends from it), and the base published."""
    checkout = RemoteCheckout(remote_url, base_commit, branch)
    _check(checkout)
    ref = f"refs/heads/{branch}"
    current = _commit_of(repository, ref)
    if current is not None and current != base_commit:
        raise RemoteError(f"branch {branch} already exists in {repository} at another commit ({current})")
    if current is None:
        zero = "0" * len(base_commit)
        run_git(
            "update-ref", "-m", "orchestrator: remote worker start", ref, base_commit, zero, cwd=repository
        )
    publish_base(repository, remote_url, base_commit)
    return checkout


def fetch_branch(
    repository: Path, remote_url: str, branch: str, base_commit: str | None = None
) -> str | None:
    """Fetch the worker's branch from the remote into `repository` as refs/heads/<branch>; its
    commit, or None if the remote has no such branch (the node never pushed).

    Refused (RemoteError) unless the fetched commit descends from the branch as the repository
    has it (made at the base by `start_checkout`, moved only by earlier fetches) and from
    `base_commit` when given: rewritten or unrelated history in the remote does not replace the
    worker's branch. With neither to check against, refused too."""
    check_remote_url(remote_url)
    _check_branch(branch)
    if base_commit is not None:
        _check_commit(base_commit)
    ref, incoming = f"refs/heads/{branch}", f"{_INCOMING_PREFIX}{branch}"
    what = f"cannot fetch branch {branch}"
    if _remote_tip(repository, remote_url, ref, what) is None:
        return None
    _remote_git(
        "-c", "fetch.fsckObjects=true", *_FETCH, "--end-of-options", remote_url, f"+{ref}:{incoming}",
        url=remote_url, cwd=repository, what=what,
    )  # fmt: skip
    try:
        new = run_git("rev-parse", "--verify", "--end-of-options", f"{incoming}^{{commit}}", cwd=repository)
        current = _commit_of(repository, ref)
        anchors = [a for a in (current, base_commit) if a]
        if not anchors:
            raise RemoteError(f"{what}: no base to check it against (start_checkout makes the branch)")
        for anchor in anchors:
            if not _is_ancestor(repository, anchor, new):
                raise RemoteError(
                    f"{what} (git remote {redact(remote_url)}): its commit {new} does not descend from "
                    f"{anchor} (rewritten or unrelated history); the branch is left as it was"
                )
        old = current or "0" * len(new)
        run_git("update-ref", "-m", "orchestrator: fetched from the remote", ref, new, old, cwd=repository)
        return new
    finally:
        with contextlib.suppress(GitError):
            run_git("update-ref", "-d", incoming, cwd=repository)


def _commit_of(cwd: Path, ref: str, *git_dir: str) -> str | None:
    """The commit `ref` names, None if there is no such ref (or it names no commit)."""
    try:
        return run_git(*git_dir, "rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}", cwd=cwd)
    except GitError:
        return None


def _is_ancestor(cwd: Path, ancestor: str, commit: str, *git_dir: str) -> bool:
    try:
        run_git(*git_dir, "merge-base", "--is-ancestor", "--end-of-options", ancestor, commit, cwd=cwd)
    except GitError:
        return False
    return True


def diff_stat(repository: Path, base_commit: str, commit: str) -> str:
    """`git diff --shortstat base..commit`, as the worker's `diff_stat` is on one machine."""
    _check_commit(base_commit)
    _check_commit(commit)
    return run_git("diff", "--shortstat", f"{base_commit}..{commit}", "--", cwd=repository)


# ---------------------------------------------------------------------------------------------
# Node side


def node_repository(worktree: Path) -> Path:
    """The node's repository of a worktree: beside it, not inside (the agent writes the worktree;
    the sandbox sees this repository only through the worktree's private git view)."""
    worktree = worktree.absolute()
    return worktree.with_name(f"{worktree.name}.git")


def _node_config(base_commit: str) -> str:
    """The node repository's whole config, written at the clone and again before each push: any
    `url.*.insteadOf`, `core.*` or `push.*` someone added is gone before git reads it."""
    if len(base_commit) == 64:
        return "[core]\n\trepositoryformatversion = 1\n\tbare = true\n[extensions]\n\tobjectformat = sha256\n"
    return "[core]\n\trepositoryformatversion = 0\n\tbare = true\n"


def clone_worktree(checkout: RemoteCheckout, dest: Path) -> None:
    """Make `dest` the worker's worktree, on `checkout.branch` at the base commit, from the
    remote: a node repository beside it (its own object store, nothing shared with the server)
    and `dest` a linked worktree of it. `dest` must not exist yet."""
    _check(checkout)
    dest = dest.absolute()
    repo = node_repository(dest)
    if dest.exists():
        raise RemoteError(f"cannot make worktree {dest}: it already exists")
    if repo.exists():
        shutil.rmtree(repo)  # a clone that did not finish
    repo.parent.mkdir(parents=True, exist_ok=True)
    base, url = checkout.base_commit, checkout.remote_url
    object_format = "sha256" if len(base) == 64 else "sha1"
    init = ("init", "--quiet", "--bare", f"--object-format={object_format}", "--end-of-options", str(repo))
    run_git(*init, cwd=repo.parent)
    (repo / "config").write_text(_node_config(base))
    git_dir = ("--git-dir", str(repo))
    ref = f"{BASE_REF_PREFIX}{base}"
    _remote_git(
        *git_dir, *_FETCH, "--end-of-options", url, f"+{ref}:{ref}",
        url=url, cwd=repo, what=f"cannot fetch base commit {base} (is it published? publish_base)",
    )  # fmt: skip
    try:
        run_git(*git_dir, "cat-file", "-e", f"{base}^{{commit}}", cwd=repo)
    except GitError:
        raise RemoteError(f"base commit {base} is not in what git remote {redact(url)} sent") from None
    # The worktree is private to the worker (umask 077), as the engine's own worktrees are.
    add = ("worktree", "add", "--quiet", "-b", checkout.branch, "--end-of-options", str(dest), base)
    run_git(*git_dir, *add, cwd=repo, umask=0o077)


def push_branch(checkout: RemoteCheckout, worktree: Path, leave_out: list[str] | None = None) -> str | None:
    """Commit what the worktree holds onto the worker's branch (as the engine's final commit
    does on one machine: the files as they are, whatever the agent committed or staged) and push
    that branch alone to the remote; the commit pushed, or None if `worktree` was never cloned.

    Reads nothing the agent could write but the worktree's files: git runs on the node
    repository by `--git-dir` (config rewritten, index rebuilt from the branch), not through the
    worktree's `.git`. A branch moved off the base (by an unconfined agent) restarts from the base.
    The paths of `leave_out` (files of max_file_mb or more: gitdirs.too_big) stay as the parent has
    them, as in the engine's own final commit."""
    _check(checkout)
    worktree = worktree.absolute()
    repo = node_repository(worktree)
    if not (repo / "HEAD").is_file() or not worktree.is_dir():
        return None
    base, branch, url = checkout.base_commit, checkout.branch, checkout.remote_url
    (repo / "config").write_text(_node_config(base))
    for stale in ("commondir", "index", "index.lock"):  # redirect files, a killed push's leftovers
        (repo / stale).unlink(missing_ok=True)
    git_dir, work_tree = ("--git-dir", str(repo)), ("--work-tree", str(worktree))
    ref = f"refs/heads/{branch}"
    parent = _commit_of(repo, ref, *git_dir) or base
    if parent != base and not _is_ancestor(repo, base, parent, *git_dir):
        parent = base
    run_git(*git_dir, *work_tree, "read-tree", "--end-of-options", parent, cwd=repo)
    _add_all(repo, (*git_dir, *work_tree), leave_out or [])
    tree = run_git(*git_dir, "write-tree", cwd=repo)
    commit = parent
    if tree != run_git(*git_dir, "rev-parse", "--verify", "--end-of-options", f"{parent}^{{tree}}", cwd=repo):
        commit = run_git(*git_dir, "commit-tree", "-p", parent, "-m", _message(branch), tree, cwd=repo)
    run_git(*git_dir, "update-ref", "-m", "orchestrator: final commit", ref, commit, cwd=repo)
    (repo / "index").unlink(missing_ok=True)
    _remote_git(
        *git_dir, *_PUSH, "--end-of-options", url, f"{commit}:{ref}",
        url=url, cwd=repo, what=f"cannot push branch {branch}",
    )  # fmt: skip
    return commit


def _add_all(repo: Path, view: tuple[str, ...], leave_out: list[str]) -> None:
    """`git add -A` of the whole worktree, but `leave_out` (exclude pathspecs in a file of the
    node repository, however many there are)."""
    if not leave_out:
        run_git(*view, "add", "-A", cwd=repo)
        return
    specs = repo / "orchestrator-pathspecs"
    excluded = [":(top)", *(f":(top,exclude,literal){path}" for path in leave_out)]
    specs.write_bytes(b"".join(os.fsencode(spec) + b"\0" for spec in excluded))
    try:
        run_git(*view, "add", "-A", f"--pathspec-from-file={specs}", "--pathspec-file-nul", cwd=repo)
    finally:
        specs.unlink(missing_ok=True)


def _message(branch: str) -> str:
    _, job, worker = branch.split("/", 2)
    return f"orchestrator: work of {worker} (job {job})"


def remove_checkout(worktree: Path) -> None:
    """Remove a worker's worktree and its node repository (after `push_branch`)."""
    worktree = worktree.absolute()
    for path in (worktree, node_repository(worktree)):
        shutil.rmtree(path, ignore_errors=True)
