"""A sandboxed agent rewrites what its worktree's git metadata says (its `.git` file, files in its
own git dir): the engine's commit of its work still lands on its own branch in its own
repository, and nothing the agent named is written (workspaces/gitdirs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.integration.test_sandbox import git, make_repo
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

REDIRECT = r"""
import json, os, sys
spec = json.loads(sys.stdin.read())
own = open(".git").read().split("gitdir: ", 1)[1].strip()
open("work.txt", "w").write("the agent's work\n")
if spec["mode"] == "gitfile":
    # Point the worktree at another repository's (or another worker's) git dir.
    with open(".git", "w") as handle:
        handle.write("gitdir: " + spec["target"] + "\n")
elif spec["mode"] == "symlinks":
    # Files git writes as the server's user in the worktree's own git dir, made symlinks to a
    # file outside the sandbox (the target need not be visible here: the engine follows it).
    for name in ("COMMIT_EDITMSG", "ORIG_HEAD", "logs/HEAD"):
        path = os.path.join(own, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(spec["target"], path)
    # And the worktree's commondir: another repository as the common dir.
    os.unlink(os.path.join(own, "commondir"))
    open(os.path.join(own, "commondir"), "w").write(spec["other_common"] + "\n")
print("REWROTE " + spec["mode"], flush=True)
"""


def agents_file(root: Path) -> str:
    scripts = root / "gitdir-scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "redirect.py").write_text(REDIRECT)
    path = root / "gitdir-agents.toml"
    path.write_text(
        f'[agents.redirect]\ncommand = ["{sys.executable}", "{scripts / "redirect.py"}"]\n'
        f'ro_binds = ["{scripts}"]\n'
        '[agents.sleeper]\ncommand = ["bash", "-c", "echo up; sleep 600 & wait"]\n'
    )
    return str(path)


def git_ok(repo: Path, *args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def refs(repo: Path) -> str:
    return git(repo, "for-each-ref", "--format=%(refname) %(objectname)")


def test_rewritten_git_metadata_cannot_redirect_the_engines_commit(servers: ServerFactory) -> None:
    repo = make_repo(servers.root / "project")
    other = make_repo(servers.root / "other")
    canary = servers.root / "canary.txt"
    canary.write_text("intact\n")
    other_refs, other_head = refs(other), (other / ".git" / "HEAD").read_text()
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root))
    with server.client() as client:
        sibling_job = submit(client, agent="sleeper", repository=str(repo))
        sibling = wait_until(
            lambda: next(
                (w for w in workers_of(client, sibling_job["id"]) if w["status"] == "RUNNING"), None
            ),
            what="sibling running",
        )
        sibling_git = repo / ".git" / "worktrees" / sibling["id"]
        sibling_head = (sibling_git / "HEAD").read_text()
        attacks = {
            "other repository": {"mode": "gitfile", "target": str(other / ".git")},
            "sibling's git dir": {"mode": "gitfile", "target": str(sibling_git)},
            "symlinks": {"mode": "symlinks", "target": str(canary), "other_common": str(other / ".git")},
        }
        harmed = []
        for label, spec in attacks.items():
            job = submit(client, agent="redirect", repository=str(repo), task_description=json.dumps(spec))
            done = wait_final(client, job["id"], timeout=120)
            worker = workers_of(client, job["id"])[0]
            assert f"REWROTE {spec['mode']}" in log_lines(client, worker["id"]), (label, worker)
            # The work is committed on the agent's own branch, in its own repository; nothing it
            # named is written.
            checks = {
                "completed": done["status"] == "COMPLETED",
                "own branch": git_ok(repo, "show", f"{worker['branch']}:work.txt") == "the agent's work",
                "commit recorded": worker["commit"] == git_ok(repo, "rev-parse", worker["branch"]),
                "other repository": refs(other) == other_refs
                and (other / ".git" / "HEAD").read_text() == other_head,
                "sibling": (sibling_git / "HEAD").read_text() == sibling_head,
                "canary": canary.read_text() == "intact\n",
            }
            harmed += [f"{label}: {name}" for name, ok in checks.items() if not ok]
        assert not harmed, harmed
        client.post(f"/api/jobs/{sibling_job['id']}/cancel")
