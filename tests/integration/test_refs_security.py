"""Refs and repositories a request names: a worker cannot start from another tree's branch, a
repository must really be under the allowed roots, base_ref is checked at submit, and git runs
with hooks, fsmonitor, signing and the server's GIT_* variables out of the way."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.integration.test_engine_workspaces_tokens import git, make_repo
from tests.support.agent_scripts import API_CALL
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

# Worker A: tries every spelling of worker B's branch as a child's base_ref, then its own branch,
# main and a commit id. B's ids are in the file VICTIM names (written once B runs).
ATTACKER = (
    API_CALL
    + r"""
import json, os, subprocess, urllib.request, urllib.error
def child(ref):
    return call("POST", "/api/jobs/submit", {"task_description": "read", "depth": 1, "parent_job_id": JOB,
                                             "agent": "reader", "base_ref": ref})
git = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True, text=True).stdout.strip()
victim = "orchestrator/" + open(os.environ["VICTIM"]).read().strip()
own = "orchestrator/" + JOB + "/" + os.environ["ORCHESTRATOR_WORKER_ID"]
open("mine.txt", "w").write("uncommitted work of A\n")
git("symbolic-ref", "refs/heads/alias", "refs/heads/" + victim)
git("symbolic-ref", "refs/tags/tagalias", "refs/heads/" + victim)
results, children = {}, {}
for name, ref in [("plain", victim), ("heads", "heads/" + victim), ("full", "refs/heads/" + victim),
                  ("symref", "alias"), ("tag_symref", "tagalias")]:
    code, body = child(ref)
    results[name] = (code, body.get("detail") if code != 201 else None)
for name, ref in [("own", own), ("main", "main"), ("commit", git("rev-parse", "main"))]:
    code, body = child(ref)
    results[name] = (code, None)
    children[name] = body.get("id")
print("RESULTS " + json.dumps({"results": results, "children": children}), flush=True)
"""
)

READER = r"""
import pathlib
print("SEES " + " ".join(sorted(p.name for p in pathlib.Path(".").iterdir() if p.name != ".git")), flush=True)
"""


def attacker_profiles(root: Path) -> str:
    (root / "attacker.py").write_text(ATTACKER)
    (root / "reader.py").write_text(READER)
    py = sys.executable
    path = root / "agents.toml"
    path.write_text(
        f'[agents.attacker]\ncommand = ["{py}", "{root / "attacker.py"}"]\n'
        f'env = {{ VICTIM = "{root / "victim"}" }}\n'
        f'[agents.reader]\ncommand = ["{py}", "{root / "reader.py"}"]\n'
        '[agents.victim]\ncommand = ["bash", "-c", "echo secret of B > secret.txt; sleep 600"]\n'
        '[agents.sleeper]\ncommand = ["sleep", "600"]\n'
    )
    return str(path)


def running_worker(client: httpx.Client, job_id: str) -> dict[str, Any]:
    worker: dict[str, Any] = wait_until(
        lambda: next((w for w in workers_of(client, job_id) if w["status"] == "RUNNING"), None),
        timeout=60,
        what=f"a running worker of {job_id}",
    )
    return worker


def test_worker_cannot_start_a_child_from_another_trees_branch(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    main = git(repo, "rev-parse", "main")
    # Unsandboxed (the operator's ORCHESTRATOR_SANDBOX=off): the agent writes refs into the shared
    # repository, and the server's ref checks are what stops it. (Sandboxed, its refs are a
    # private copy the server never resolves: tests/integration/test_sandbox.py.)
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=attacker_profiles(servers.root), ORCHESTRATOR_SANDBOX="off"
    )
    with server.client() as client:
        victim_job = submit(client, agent="victim", repository=str(repo))
        victim = running_worker(client, victim_job["id"])
        victim_dir = servers.root / "data" / "workspaces" / victim["id"]
        wait_until(lambda: (victim_dir / "secret.txt").exists(), timeout=60, what="B's uncommitted file")
        (servers.root / "victim").write_text(f"{victim_job['id']}/{victim['id']}")

        attacker_job = submit(client, agent="attacker", repository=str(repo))
        assert wait_final(client, attacker_job["id"], timeout=120)["status"] == "COMPLETED"
        (attacker,) = workers_of(client, attacker_job["id"])
        line = next(x for x in log_lines(client, attacker["id"]) if x.startswith("RESULTS "))
        report: dict[str, Any] = json.loads(line.removeprefix("RESULTS "))
        results = {name: code for name, (code, _) in report["results"].items()}
        assert results == {
            "plain": 403,
            "heads": 403,
            "full": 403,
            "symref": 403,
            "tag_symref": 403,
            "own": 201,
            "main": 201,
            "commit": 201,
        }, report
        assert "outside this token's job subtree" in report["results"]["symref"][1]

        seen = {}
        for name, child_id in report["children"].items():
            wait_final(client, child_id, timeout=120)
            (child,) = workers_of(client, child_id)
            seen[name] = next(x for x in log_lines(client, child["id"]) if x.startswith("SEES "))
        assert "mine.txt" in seen["own"], seen  # the delegating worker's own work is checkpointed
        assert not any("secret.txt" in text for text in seen.values()), seen
        # B's live worktree was never checkpointed: its branch is where it started, its file uncommitted.
        assert git(repo, "rev-parse", f"orchestrator/{victim_job['id']}/{victim['id']}") == main
        assert git(victim_dir, "status", "--porcelain") == "?? secret.txt"
        client.post(f"/api/jobs/{victim_job['id']}/cancel")


RETARGETER = (
    API_CALL
    + r"""
import json, os, subprocess, time, urllib.request, urllib.error
git = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True, text=True).stdout.strip()
victim = "orchestrator/" + open(os.environ["VICTIM"]).read().strip()
# The only depth-1 slot is taken by a sleeper, so the next child waits while its ref is changed.
code, blocker = call("POST", "/api/jobs/submit", {"task_description": "block", "depth": 1, "parent_job_id": JOB, "agent": "sleeper"})
assert code == 201, blocker
while not any(w["status"] == "RUNNING" for w in call("GET", "/api/supervisor/workers?job_id=" + blocker["id"])[1]["workers"]):
    time.sleep(0.1)
git("branch", "later", "main")
code, child = call("POST", "/api/jobs/submit", {"task_description": "read", "depth": 1, "parent_job_id": JOB,
                                                "agent": "reader", "base_ref": "later"})
git("symbolic-ref", "refs/heads/later", "refs/heads/" + victim)
call("POST", "/api/jobs/" + blocker["id"] + "/cancel")
while call("GET", "/api/jobs/" + child["id"])[1]["status"] not in ("COMPLETED", "FAILED", "CANCELED"):
    time.sleep(0.1)
print("CHILD " + json.dumps({"code": code, "id": child["id"]}), flush=True)
"""
)


def test_a_ref_retargeted_after_the_submit_is_checked_again_at_the_start(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    profiles = attacker_profiles(servers.root)
    (servers.root / "retargeter.py").write_text(RETARGETER)
    with open(profiles, "a") as handle:
        handle.write(
            f'[agents.retargeter]\ncommand = ["{sys.executable}", "{servers.root / "retargeter.py"}"]\n'
            f'env = {{ VICTIM = "{servers.root / "victim"}" }}\n'
        )
    # Unsandboxed, as above: the ref is retargeted in the shared repository.
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=profiles, ORCHESTRATOR_QUOTAS="10,1", ORCHESTRATOR_SANDBOX="off"
    )
    with server.client() as client:
        victim_job = submit(client, agent="victim", repository=str(repo))
        victim = running_worker(client, victim_job["id"])
        (servers.root / "victim").write_text(f"{victim_job['id']}/{victim['id']}")
        job = submit(client, agent="retargeter", repository=str(repo))
        wait_final(client, job["id"], timeout=120)  # FAILED with its failed child
        (worker,) = workers_of(client, job["id"])
        line = next(x for x in log_lines(client, worker["id"]) if x.startswith("CHILD "))
        child = json.loads(line.removeprefix("CHILD "))
        assert child["code"] == 201
        final = client.get(f"/api/jobs/{child['id']}").json()
        (child_worker,) = workers_of(client, child["id"])
        assert final["status"] == "FAILED" and child_worker["status"] == "FAILED", (final, child_worker)
        assert "outside this token's job subtree" in (child_worker["status_reason"] or ""), child_worker
        client.post(f"/api/jobs/{victim_job['id']}/cancel")


# --- repositories: the real git dir and common dir must be under a root ----------------------


def outside_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository outside the server's roots (the roots are the test's own directory)."""
    return make_repo(tmp_path_factory.mktemp("outside"))


def submit_repo(client: httpx.Client, repository: Path | str) -> httpx.Response:
    return client.post("/api/jobs/submit", json={"task_description": "x", "repository": str(repository)})


def test_repositories_whose_git_dir_is_elsewhere_are_400(
    servers: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = outside_repo(tmp_path_factory)
    root = servers.root
    server = servers.start()

    gitfile = root / "gitfile"  # `.git` is a file: gitdir: /outside/.git
    gitfile.mkdir()
    (gitfile / ".git").write_text(f"gitdir: {outside / '.git'}\n")

    gitlink = root / "gitlink"  # `.git` is a symlink to the outside repository's
    gitlink.mkdir()
    (gitlink / ".git").symlink_to(outside / ".git")

    (root / "symlinked").symlink_to(outside)  # the repository itself is a symlink

    # A git dir inside the roots whose `commondir` is outside: a copy of a linked worktree's dir.
    git(outside, "worktree", "add", "-q", "--detach", str(tmp_path_factory.mktemp("wt") / "w"))
    admin = root / "admin"
    admin.mkdir()
    (worktree_admin,) = (outside / ".git" / "worktrees").iterdir()
    for name in ("HEAD", "gitdir"):
        (admin / name).write_bytes((worktree_admin / name).read_bytes())
    (admin / "commondir").write_text(f"{outside / '.git'}\n")
    commondir = root / "commondir"
    commondir.mkdir()
    (commondir / ".git").write_text(f"gitdir: {admin}\n")
    assert git(commondir, "rev-parse", "--git-common-dir") == str(outside / ".git")

    with server.client() as client:
        for path in (gitfile, gitlink, root / "symlinked", commondir):
            response = submit_repo(client, path)
            assert response.status_code == 400, (path, response.text)
            assert "not under an allowed root" in response.json()["detail"], response.text
        project = make_repo(root)
        redirected = root / "redirected"  # its git dir says the work tree is elsewhere
        redirected.mkdir()
        git(redirected, "init", "-q")
        git(redirected, "config", "core.worktree", str(project))
        response = submit_repo(client, redirected)
        assert response.status_code == 400 and "top level" in response.json()["detail"], response.text
        inner = root / "data" / "inner"  # inside the data dir (where worktrees live)
        inner.mkdir(parents=True)
        make_repo(inner)
        response = submit_repo(client, inner / "project")
        assert response.status_code == 400 and "data directory" in response.json()["detail"], response.text
        assert submit_repo(client, project).status_code == 201
    # No worktree was ever registered in the outside repository.
    assert git(outside, "worktree", "list").count("\n") == 1


FORGED = "2026-01-01 CRITICAL forged by the attacker"


def test_repository_swapped_after_submit_is_checked_again_before_worktree_add(
    servers: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Also the log check: the repository's name carries a newline and a fake log line, and the
    warning the engine logs about the failed start names it."""
    outside = outside_repo(tmp_path_factory)
    repo_parent = servers.root / f"evil\n{FORGED}"
    repo_parent.mkdir()
    repo = make_repo(repo_parent)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=attacker_profiles(servers.root), ORCHESTRATOR_QUOTAS="1")
    with server.client() as client:
        blocker = submit(client, agent="sleeper")  # the only slot: the next job waits
        running_worker(client, blocker["id"])
        job = submit(client, agent="sleeper", repository=str(repo))
        assert job["status"] == "PENDING"
        os.rename(repo / ".git", repo.parent / "moved.git")
        (repo / ".git").write_text(f"gitdir: {outside / '.git'}\n")
        client.post(f"/api/jobs/{blocker['id']}/cancel")
        final = wait_final(client, job["id"], timeout=120)
        (worker,) = workers_of(client, job["id"])
        assert final["status"] == "FAILED", final
        assert "not under an allowed root" in (worker["status_reason"] or ""), worker
    assert git(outside, "worktree", "list").count("\n") == 0, "no worktree added outside the roots"
    server.stop()
    log = server.log()
    assert "could not start" in log, log
    assert not any(line.startswith(FORGED) for line in log.splitlines()), log
    assert f"evil\\n{FORGED}" in log


# --- base_ref at submit ------------------------------------------------------------------


MALFORMED_REFS = [
    "-x",
    "--upload-pack=touch /tmp/pwned",
    "main..other",
    "main\nINFO forged line",
    "main\r",
    "a\u2028b",
    "HEAD~1",
    "a b",
    "a:b",
    "refs/heads/.hidden",
    "x.lock",
    "@",
    "main@{1}",
    "/main",
    "",
]


def test_malformed_base_ref_is_422_at_submit(server: Server) -> None:
    (server.root / "r").mkdir()
    repo = make_repo(server.root / "r")
    with server.client() as client:
        for ref in MALFORMED_REFS:
            response = client.post(
                "/api/jobs/submit", json={"task_description": "x", "repository": str(repo), "base_ref": ref}
            )
            assert response.status_code == 422, (ref, response.text)
            (error,) = response.json()["detail"]
            assert error["loc"] == ["body", "base_ref"], error
        assert client.get("/api/jobs").json()["total"] == 0


def test_base_ref_must_resolve_in_the_repository(server: Server) -> None:
    (server.root / "r").mkdir()
    repo = make_repo(server.root / "r")
    git(repo, "tag", "v1")
    commit = git(repo, "rev-parse", "main")
    with server.client() as client:

        def post(**body: Any) -> httpx.Response:
            return client.post("/api/jobs/submit", json={"task_description": "x", **body})

        for ref in ("no-such-branch", "0" * 40, "refs/heads/nope"):
            response = post(repository=str(repo), base_ref=ref)
            assert response.status_code == 400, response.text
            assert "does not resolve" in response.json()["detail"]
        for ref in ("main", "v1", "refs/heads/main", "heads/main", commit, commit[:10]):
            response = post(repository=str(repo), base_ref=ref, agent_options={"duration_seconds": 0})
            assert response.status_code == 201, (ref, response.text)
            assert response.json()["base_ref"] == ref
        response = post(base_ref="main")
        assert response.status_code == 422 and "needs a repository" in response.text, response.text


# --- git runs with the server's GIT_* variables, hooks, fsmonitor and signing out of the way ---

MARKER_SCRIPT = '#!/bin/sh\necho "$0 ran" >> "{marker}"\nexit 1\n'


def test_git_ignores_hooks_fsmonitor_signing_and_git_environment(
    servers: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    repo = make_repo(servers.root)
    marker = servers.root / "ran.txt"
    script = servers.root / "hostile.sh"
    script.write_text(MARKER_SCRIPT.format(marker=marker))
    script.chmod(0o755)
    for hook in ("post-checkout", "pre-commit", "post-commit", "reference-transaction", "commit-msg"):
        (repo / ".git" / "hooks" / hook).symlink_to(script)
    git(repo, "config", "core.fsmonitor", str(script))
    git(repo, "config", "commit.gpgSign", "true")
    git(repo, "config", "gpg.program", str(script))
    decoy = make_repo(tmp_path_factory.mktemp("decoy"))
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=attacker_profiles(servers.root),
        GIT_DIR=str(decoy / ".git"),
        GIT_WORK_TREE=str(decoy),
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0="core.hooksPath",
        GIT_CONFIG_VALUE_0=str(repo / ".git" / "hooks"),
    )
    with server.client() as client:
        job = submit(client, agent="victim", repository=str(repo), base_ref="main", timeout_seconds=600)
        worker = running_worker(client, job["id"])
        workdir = servers.root / "data" / "workspaces" / worker["id"]
        wait_until(lambda: (workdir / "secret.txt").exists(), timeout=60, what="the worker's file")
        client.post(f"/api/supervisor/workers/{worker['id']}/terminate")
        wait_final(client, job["id"], timeout=120)
        final = wait_until(
            lambda: (w := client.get(f"/api/supervisor/workers/{worker['id']}").json())["commit"] and w,
            timeout=60,
            what="the worker's commit",
        )
    assert "commit_error" not in (final["result"] or {}), final
    assert git(repo, "show", f"{final['branch']}:secret.txt") == "secret of B"
    assert not marker.exists(), marker.read_text()
    assert git(decoy, "branch", "--list").strip() == "* main", "nothing was done in the decoy"
