"""Workspaces on a remote node (workspaces/remote.py), with real git and real repositories.

The server's repository, the bare remote and the node's directory are separate trees: the node
gets everything through the remote (its object store shares nothing with the server's), and the
work comes back the same way, as the branch, commit and diff stat the API and the result
integration read on one machine. The agent's side is hostile: the worktree it leaves may carry
a rewritten `.git`, hooks and config meant to run code or push somewhere else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.core.config import Settings
from orchestrator.executors import sandbox
from orchestrator.workspaces import merge, remote
from orchestrator.workspaces.git import worktree_git_dirs
from orchestrator.workspaces.remote import RemoteCheckout, RemoteError

BRANCH = "orchestrator/j_one/w_one"
IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
}


def git(*args: str, cwd: Path, check: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | IDENTITY
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"git {args} failed: {done.stderr}")
    return done.stdout.strip()


class World:
    """The server's repository, a bare remote, and a node directory, each its own tree."""

    def __init__(self, root: Path, flavor: str) -> None:
        self.root = root
        self.repo = root / "server" / "project"
        self.repo.mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=self.repo)
        (self.repo / "a.txt").write_text("one\ntwo\nthree\n")
        (self.repo / "lib").mkdir()
        (self.repo / "lib" / "b.txt").write_text("bee\n")
        git("add", "-A", cwd=self.repo)
        git("commit", "-q", "-m", "initial", cwd=self.repo)
        self.base = git("rev-parse", "HEAD", cwd=self.repo)
        self.bare = root / "remote" / "project.git"
        self.bare.mkdir(parents=True)
        git("init", "-q", "--bare", cwd=self.bare)
        self.url = self.bare.as_uri() if flavor == "file-url" else str(self.bare)
        self.node = root / "node" / "workspaces"
        self.node.mkdir(parents=True)

    def checkout(self, branch: str = BRANCH) -> RemoteCheckout:
        return remote.start_checkout(self.repo, self.url, branch, self.base)


def refs_of(repo: Path) -> dict[str, str]:
    listed = git("for-each-ref", "--format=%(refname) %(objectname)", cwd=repo)
    return {name: sha for name, sha in (line.split(" ") for line in listed.splitlines())}


@pytest.fixture(params=["path", "file-url"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> World:
    return World(tmp_path, request.param)


def test_clone_is_at_the_base_on_the_workers_branch_with_its_own_object_store(world: World) -> None:
    checkout = world.checkout()
    assert checkout == RemoteCheckout(world.url, world.base, BRANCH)
    # The branch exists on the server from the start, at the base, as on one machine.
    assert git("rev-parse", f"refs/heads/{BRANCH}", cwd=world.repo) == world.base
    assert refs_of(world.bare) == {f"refs/orchestrator/base/{world.base}": world.base}

    dest = world.node / "w_one"
    remote.clone_worktree(checkout, dest)
    assert git("rev-parse", "HEAD", cwd=dest) == world.base
    assert git("symbolic-ref", "HEAD", cwd=dest) == f"refs/heads/{BRANCH}"
    assert git("status", "--porcelain", cwd=dest) == ""
    assert (dest / "lib" / "b.txt").read_text() == "bee\n"
    node_repo = remote.node_repository(dest)
    assert node_repo == world.node / "w_one.git"
    assert Path(git("rev-parse", "--git-common-dir", cwd=dest)).resolve() == node_repo.resolve()
    # Nothing shared with the server's store: no alternates, and the server's path is nowhere.
    assert not (node_repo / "objects" / "info" / "alternates").exists()
    for path in node_repo.rglob("*"):
        if path.is_file() and path.suffix not in (".pack", ".idx", ".rev"):
            assert str(world.repo) not in path.read_text(errors="replace"), path
    assert git("rev-parse", "--verify", f"{world.base}^{{commit}}", cwd=node_repo) == world.base


def test_engines_publishing_the_same_base_at_once_all_succeed(world: World) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        done = [pool.submit(remote.publish_base, world.repo, world.url, world.base) for _ in range(12)]
        for future in done:
            future.result()
    assert refs_of(world.bare) == {f"refs/orchestrator/base/{world.base}": world.base}


def test_a_base_that_was_not_published_is_a_clear_error(world: World) -> None:
    (world.repo / "later.txt").write_text("later\n")
    git("add", "-A", cwd=world.repo)
    git("commit", "-q", "-m", "later", cwd=world.repo)
    unpublished = git("rev-parse", "HEAD", cwd=world.repo)
    with pytest.raises(RemoteError) as err:
        remote.clone_worktree(RemoteCheckout(world.url, unpublished, BRANCH), world.node / "w")
    assert unpublished in str(err.value) and "publish" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (world.node / "w").exists()


def _diff_stat(repo: Path, base: str, ref: str) -> dict[str, str]:
    lines = git("diff", "--stat=200", f"{base}..{ref}", cwd=repo).splitlines()[:-1]
    return {line.split("|")[0].strip(): line.split("|")[1].strip() for line in lines}


def test_work_comes_back_as_the_branch_commit_and_diff_stat(world: World) -> None:
    checkout = world.checkout()
    dest = world.node / "w_one"
    remote.clone_worktree(checkout, dest)
    # The agent's work: a commit of its own, then more edits it never committed.
    (dest / "a.txt").write_text("one\nTWO\nthree\nfour\n")
    git("commit", "-q", "-am", "agent's own commit", cwd=dest)
    (dest / "lib" / "b.txt").unlink()
    (dest / "new").mkdir()
    (dest / "new" / "c.txt").write_text("sea\n")

    commit = remote.push_branch(checkout, dest)
    assert commit is not None
    assert refs_of(world.bare)[f"refs/heads/{BRANCH}"] == commit
    assert remote.fetch_branch(world.repo, world.url, BRANCH) == commit
    assert git("rev-parse", f"refs/heads/{BRANCH}", cwd=world.repo) == commit
    # Unsandboxed here, the agent's own commit is on the node's branch (in the sandbox it is in
    # its private view, as on one machine): the final commit goes on top of it.
    assert git("log", "--format=%s", f"{world.base}..{commit}", cwd=world.repo).splitlines() == [
        "orchestrator: work of w_one (job j_one)",
        "agent's own commit",
    ]
    assert git("show", f"{BRANCH}:new/c.txt", cwd=world.repo) == "sea"
    assert _diff_stat(world.repo, world.base, BRANCH) == {
        "a.txt": "3 ++-",
        "lib/b.txt": "1 -",
        "new/c.txt": "1 +",
    }
    stat = remote.diff_stat(world.repo, world.base, commit)
    assert stat == git("diff", "--shortstat", f"{world.base}..{commit}", cwd=world.repo)
    assert stat.startswith("3 files changed, 3 insertions(+), 2 deletions(-)")
    assert not any(name.startswith("refs/orchestrator/incoming/") for name in refs_of(world.repo))

    # A second push with nothing new pushes the same commit; more work fast-forwards the branch.
    assert remote.push_branch(checkout, dest) == commit
    (dest / "new" / "c.txt").write_text("sea\nsalt\n")
    second = remote.push_branch(checkout, dest)
    assert second is not None and second != commit
    assert remote.fetch_branch(world.repo, world.url, BRANCH, base_commit=world.base) == second
    assert git("rev-parse", f"{second}^", cwd=world.repo) == commit


def test_result_integration_merges_branches_that_came_back_from_nodes(world: World) -> None:
    """Two workers on two "nodes" edit different files: their fetched branches merge as local ones do."""
    merged_into = world.base
    for index, name in enumerate(("x.txt", "y.txt")):
        branch = f"orchestrator/j_one/w_{index}"
        checkout = world.checkout(branch)
        dest = world.root / f"node{index}" / "w"
        remote.clone_worktree(checkout, dest)
        (dest / name).write_text(f"{name}\n")
        remote.push_branch(checkout, dest)
        assert remote.fetch_branch(world.repo, world.url, branch) is not None
        done = merge.merge_in_memory(world.repo, merged_into, branch, f"merge {branch}")
        assert done is not None and done.merge_commit is not None
        merged_into = done.merge_commit
    files = git("ls-tree", "-r", "--name-only", merged_into, cwd=world.repo).splitlines()
    assert sorted(files) == ["a.txt", "lib/b.txt", "x.txt", "y.txt"]


def test_work_of_a_terminated_agent_is_committed_and_pushed(world: World) -> None:
    checkout = world.checkout()
    dest = world.node / "w_one"
    remote.clone_worktree(checkout, dest)
    script = (
        "echo staged > staged.txt && git add staged.txt && echo loose > loose.txt && "
        "echo changed >> a.txt && touch .ready && exec sleep 600"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    agent = subprocess.Popen(["sh", "-c", script], cwd=dest, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (dest / ".ready").exists():
            assert agent.poll() is None, "the agent ended before it was terminated"
            assert time.monotonic() < deadline, "the agent never got going"
            time.sleep(0.05)
    finally:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(timeout=60)
    assert agent.returncode == -signal.SIGKILL

    commit = remote.push_branch(checkout, dest)
    assert commit is not None and commit != world.base
    assert remote.fetch_branch(world.repo, world.url, BRANCH) == commit
    files = git("ls-tree", "-r", "--name-only", commit, cwd=world.repo).splitlines()
    assert {"staged.txt", "loose.txt", ".ready"} <= set(files)
    assert git("show", f"{commit}:a.txt", cwd=world.repo).endswith("changed")


def _sentinel_script(path: Path, sentinel: Path) -> Path:
    path.write_text(f'#!/bin/sh\necho "$0" >> {sentinel}\nexit 0\n')
    path.chmod(0o755)
    return path


def _poison_config(
    config: Path, *, hooks: Path, fsmonitor: Path, evil_url: str, url: str, sentinel: Path
) -> None:
    config.write_text(
        "[core]\n"
        f"\thooksPath = {hooks}\n"
        f"\tfsmonitor = {fsmonitor}\n"
        f"\tsshCommand = {fsmonitor}\n"
        f'[url "{evil_url}"]\n'
        f"\tinsteadOf = {url}\n"
        f"\tpushInsteadOf = {url}\n"
        "[push]\n"
        "\tfollowTags = true\n"
        "\trecurseSubmodules = on-demand\n"
        '[filter "evil"]\n'
        f"\tclean = {fsmonitor}\n"
        f"\tprocess = {fsmonitor}\n"
        "\trequired = true\n"
        f"[include]\n\tpath = {sentinel.parent / 'extra.cfg'}\n"
    )


@pytest.mark.parametrize("poison", ["git-file-redirect", "git-directory", "node-repository"])
def test_a_poisoned_worktree_runs_nothing_and_pushes_only_its_branch(world: World, poison: str) -> None:
    checkout = world.checkout()
    dest = world.node / "w_one"
    remote.clone_worktree(checkout, dest)
    node_repo = remote.node_repository(dest)
    trap = world.root / "trap"
    trap.mkdir()
    sentinel = trap / "ran"
    evil = world.root / "evil.git"
    git("init", "-q", "--bare", str(evil), cwd=world.root)
    fsmonitor = _sentinel_script(trap / "fsmonitor", sentinel)
    hooks = trap / "hooks"
    hooks.mkdir()
    for name in (
        "pre-commit",
        "commit-msg",
        "post-commit",
        "pre-push",
        "reference-transaction",
        "post-index-change",
    ):
        _sentinel_script(hooks / name, sentinel)
    poisoned = {
        "hooks": hooks,
        "fsmonitor": fsmonitor,
        "evil_url": str(evil),
        "url": world.url,
        "sentinel": sentinel,
    }
    (trap / "extra.cfg").write_text(f'[url "{evil}"]\n\tpushInsteadOf = {world.url}\n')

    # The agent's work, with attributes asking for the poisoned filter.
    (dest / "work.txt").write_text("work\n")
    (dest / ".gitattributes").write_text("* filter=evil\n")
    # An unrelated commit the agent made, and a ref naming it, in the node repository.
    orphan_tree = git("--git-dir", str(node_repo), "mktree", cwd=world.root)
    orphan = git("--git-dir", str(node_repo), "commit-tree", "-m", "orphan", orphan_tree, cwd=world.root)
    if poison == "git-file-redirect":
        other = world.root / "attacker"
        git("init", "-q", str(other), cwd=world.root)
        _poison_config(other / ".git" / "config", **poisoned)
        (dest / ".git").write_text(f"gitdir: {other / '.git'}\n")
    elif poison == "git-directory":
        (dest / ".git").unlink()
        git("init", "-q", str(dest), cwd=world.root)
        _poison_config(dest / ".git" / "config", **poisoned)
        for name in os.listdir(hooks):
            _sentinel_script(dest / ".git" / "hooks" / name, sentinel)
    else:  # what an unconfined agent could do to the node repository itself
        git("--git-dir", str(node_repo), "update-ref", f"refs/heads/{BRANCH}", orphan, cwd=world.root)
        git("--git-dir", str(node_repo), "update-ref", "refs/heads/main", orphan, cwd=world.root)
        git("--git-dir", str(node_repo), "tag", "-a", "-m", "t", "v-evil", orphan, cwd=world.root)
        _poison_config(node_repo / "config", **poisoned)
        for name in os.listdir(hooks):
            _sentinel_script(node_repo / "hooks" / name, sentinel)
        own = node_repo / "worktrees" / dest.name
        (own / "HEAD").write_text("ref: refs/heads/main\n")
        (own / "index").write_bytes(b"not an index")
        (own / "config.worktree").write_text(f"[core]\n\thooksPath = {hooks}\n")
        (node_repo / "commondir").write_text(str(evil) + "\n")

    commit = remote.push_branch(checkout, dest)

    assert not sentinel.exists(), sentinel.read_text()
    assert refs_of(evil) == {}
    assert set(refs_of(world.bare)) == {f"refs/orchestrator/base/{world.base}", f"refs/heads/{BRANCH}"}
    assert commit is not None and refs_of(world.bare)[f"refs/heads/{BRANCH}"] == commit
    assert git("rev-parse", f"{commit}^", cwd=world.bare) == world.base
    files = git("ls-tree", "-r", "--name-only", commit, cwd=world.bare).splitlines()
    assert "work.txt" in files and not any(f == ".git" or f.startswith(".git/") for f in files)
    assert git("show", f"{commit}:work.txt", cwd=world.bare) == "work"  # no clean filter ran
    assert remote.fetch_branch(world.repo, world.url, BRANCH) == commit
    assert not sentinel.exists()


def _orphan_in_remote(world: World, ref: str, parent: str | None = None) -> str:
    """Push a commit straight into the remote (as another party could), not via the module."""
    scratch = world.root / "scratch"
    if not scratch.exists():
        git("clone", "-q", str(world.repo), str(scratch), cwd=world.root)
    tree = (
        git("mktree", cwd=scratch) if parent is None else git("rev-parse", f"{parent}^{{tree}}", cwd=scratch)
    )
    args = ["commit-tree", "-m", "other history", tree] + (["-p", parent] if parent else [])
    made = git(*args, cwd=scratch)
    git("push", "-q", "-f", str(world.bare), f"{made}:{ref}", cwd=scratch)
    return made


def test_a_branch_that_does_not_descend_from_its_start_is_refused(world: World) -> None:
    checkout = world.checkout()
    ref = f"refs/heads/{BRANCH}"
    unrelated = _orphan_in_remote(world, ref)
    with pytest.raises(RemoteError) as err:
        remote.fetch_branch(world.repo, world.url, BRANCH)
    assert "does not descend" in str(err.value) and unrelated in str(err.value)
    assert git("rev-parse", ref, cwd=world.repo) == world.base
    assert not any(name.startswith("refs/orchestrator/incoming/") for name in refs_of(world.repo))

    # Real work comes back; then the remote's branch is rewritten to a sibling: not a fast-forward.
    dest = world.node / "w_one"
    remote.clone_worktree(checkout, dest)
    git("push", "-q", "-f", str(world.bare), f"{world.base}:{ref}", cwd=world.repo)
    (dest / "work.txt").write_text("work\n")
    commit = remote.push_branch(checkout, dest)
    assert remote.fetch_branch(world.repo, world.url, BRANCH) == commit
    sibling = _orphan_in_remote(world, ref, parent=world.base)
    with pytest.raises(RemoteError, match="does not descend"):
        remote.fetch_branch(world.repo, world.url, BRANCH)
    assert git("rev-parse", ref, cwd=world.repo) == commit
    assert sibling != commit


def test_fetch_checks_the_given_base_and_needs_something_to_check(world: World) -> None:
    other = "orchestrator/j_one/w_two"
    ref = f"refs/heads/{other}"
    (world.repo / "later.txt").write_text("later\n")
    git("add", "-A", cwd=world.repo)
    git("commit", "-q", "-m", "later", cwd=world.repo)
    later = git("rev-parse", "HEAD", cwd=world.repo)
    _orphan_in_remote(world, ref, parent=world.base)
    with pytest.raises(RemoteError, match="no base to check"):
        remote.fetch_branch(world.repo, world.url, other)
    with pytest.raises(RemoteError, match="does not descend"):
        remote.fetch_branch(world.repo, world.url, other, base_commit=later)
    assert git("rev-parse", "--verify", "--quiet", ref, cwd=world.repo, check=False) == ""
    fetched = remote.fetch_branch(world.repo, world.url, other, base_commit=world.base)
    assert fetched is not None and git("rev-parse", ref, cwd=world.repo) == fetched
    # A branch the node never pushed: None, nothing made.
    assert (
        remote.fetch_branch(world.repo, world.url, "orchestrator/j_one/w_none", base_commit=world.base)
        is None
    )


BAD_URLS = [
    ("/nonexistent/remote.git", "does not appear to be a git repository"),
    ("file:///nonexistent/remote.git", "/nonexistent/remote.git"),
    ("https://user:s3cr3t-token@127.0.0.1:1/project.git", "127.0.0.1"),
    ("ext::sh -c touch% {trap}", "remote helper transports"),
    ("-uhack", "must not start with '-'"),
    ("relative/remote.git", "absolute path"),
    ("ftp://host/remote.git", "scheme 'ftp'"),
    ("/path/with\nnewline", "printable"),
]


@pytest.mark.parametrize(("url", "reason"), BAD_URLS)
def test_a_bad_remote_is_a_clear_one_line_error(world: World, url: str, reason: str) -> None:
    trap = world.root / "ran"
    url = url.replace("{trap}", str(trap))
    dest = world.node / "w_one"
    calls = [
        lambda: remote.publish_base(world.repo, url, world.base),
        lambda: remote.start_checkout(world.repo, url, BRANCH, world.base),
        lambda: remote.clone_worktree(RemoteCheckout(url, world.base, BRANCH), dest),
        lambda: remote.fetch_branch(world.repo, url, BRANCH, base_commit=world.base),
    ]
    for call in calls:
        with pytest.raises(RemoteError) as err:
            call()
        message = str(err.value)
        assert reason in message, message
        assert "\n" not in message and "Traceback" not in message and "s3cr3t" not in message
        assert err.value.__cause__ is None
    assert not trap.exists()
    # push_branch, from a real clone, to the bad remote.
    remote.clone_worktree(world.checkout(), dest)
    with pytest.raises(RemoteError) as err:
        remote.push_branch(RemoteCheckout(url, world.base, BRANCH), dest)
    assert reason in str(err.value) and "s3cr3t" not in str(err.value)


def test_git_itself_refuses_a_command_transport(world: World) -> None:
    """The transport allow-list holds even for a URL the format check would not see."""
    trap = world.root / "ran"
    with pytest.raises(RemoteError, match="transport 'ext' not allowed"):
        remote._remote_git(
            "ls-remote", f"ext::sh -c touch% {trap}", url="ext::", cwd=world.repo, what="probe"
        )
    assert not trap.exists()


@pytest.mark.parametrize(
    "branch", ["main", "refs/heads/orchestrator/j/w", "orchestrator/j/../w", "orchestrator/j/w --force", "-f"]
)
def test_branch_names_are_checked_before_git_sees_them(world: World, branch: str) -> None:
    with pytest.raises(RemoteError, match="branch"):
        remote.start_checkout(world.repo, world.url, branch, world.base)
    with pytest.raises(RemoteError, match="branch"):
        remote.fetch_branch(world.repo, world.url, branch, base_commit=world.base)
    with pytest.raises(RemoteError, match="base commit"):
        remote.clone_worktree(RemoteCheckout(world.url, "HEAD", BRANCH), world.node / "w")
    assert refs_of(world.bare) == {}


def test_the_remote_comes_from_the_repositorys_table_or_the_default(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    toml = tmp_path / "agents.toml"
    toml.write_text(f'[repositories."{mine}"]\ngit_remote = "ssh://git@gitserver/mine.git"\n')
    settings = Settings(orchestrator_agents_file=toml, orchestrator_git_remote="/srv/git/all.git")
    assert remote.git_remote_for(settings, mine) == "ssh://git@gitserver/mine.git"
    assert remote.git_remote_for(settings, other) == "/srv/git/all.git"
    assert remote.git_remote_for(Settings(orchestrator_agents_file=toml), other) is None
    toml.write_text(f'[repositories."{mine}"]\ngit_remote = "ext::sh -c id"\n')
    os.utime(toml, (time.time() + 10, time.time() + 10))  # a new mtime: the table is read again
    with pytest.raises(RemoteError, match="remote helper"):
        remote.git_remote_for(settings, mine)
    toml.write_text(f'[repositories."{mine}"]\ngit_remote = 42\n')
    os.utime(toml, (time.time() + 20, time.time() + 20))
    with pytest.raises(ValueError, match="git_remote must be a non-empty string"):
        remote.git_remote_for(settings, mine)


AGENT = """
set -u
echo work > work.txt
git add -A && git commit -q -m "the agent's own commit" && echo committed >> report
git update-ref refs/heads/$BRANCH $(git rev-parse HEAD) && echo moved-branch >> report
printf '[url "/elsewhere"]\\n\\tpushInsteadOf = x\\n' >> "$NODE_REPO/config" && echo wrote-config >> report
touch "$NODE_REPO/objects/planted" 2>/dev/null && echo planted-object >> report
touch "$NODE_REPO/hooks/pre-push" 2>/dev/null && echo planted-hook >> report
echo more > more.txt
echo "gitdir: /nonexistent" > .git
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_sandboxed_agent_on_the_node_has_the_same_private_git_view(world: World) -> None:
    """The node's layout (a linked worktree of a node repository) gets the git view the engine
    builds on one machine (engine `_start_process`, repeated here): the agent's own commits and
    refs stay private, the node repository is read-only to it, and its work still comes back."""
    checkout = world.checkout()
    dest, run_dir = world.node / "w_one", world.node / "runs" / "w_one"
    home = run_dir / "home"
    remote.clone_worktree(checkout, dest)
    host = sandbox.detect(world.root / "data")
    assert host.usable, host.problem
    dirs = worktree_git_dirs(dest)
    assert dirs is not None
    own, common = dirs
    assert common == remote.node_repository(dest).resolve()
    config_before = (common / "config").read_text()
    objects, private = home / ".git-objects", run_dir / "git-common"
    objects.mkdir(parents=True)
    sandbox.private_git_common(common, own, private)
    box = sandbox.SandboxSpec(dest, home, network=False)
    box.mounts += [
        (str(private), str(common), True),
        (str(common / "objects"), str(common / "objects"), False),
        (str(own), str(common / "worktrees" / own.name), True),
    ]
    sandbox.give_to_agent(host, own, private, home, dest)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "BRANCH": BRANCH, "NODE_REPO": str(common)}
    env |= IDENTITY | {
        "GIT_OBJECT_DIRECTORY": str(objects),
        "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(common / "objects"),
    }
    argv = sandbox.command(host, box, ["/bin/sh", "-c", AGENT])
    assert host.seccomp is not None
    done = subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" 9<"$0"', str(host.seccomp), *argv],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Git worked for the agent, on its private view only.
    assert (dest / "report").read_text().split() == ["committed", "moved-branch", "wrote-config"]
    assert git("rev-parse", f"refs/heads/{BRANCH}", cwd=common) == world.base
    assert (common / "config").read_text() == config_before
    assert not (common / "objects" / "planted").exists() and not (common / "hooks" / "pre-push").exists()

    commit = remote.push_branch(checkout, dest)
    assert commit is not None
    assert remote.fetch_branch(world.repo, world.url, BRANCH) == commit
    assert git("rev-parse", f"{commit}^", cwd=world.repo) == world.base  # one commit: the work as left
    files = git("ls-tree", "-r", "--name-only", commit, cwd=world.repo).splitlines()
    assert {"work.txt", "more.txt", "report"} <= set(files) and ".git" not in files
